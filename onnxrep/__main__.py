"""``python -m onnxrep``: the command line (:mod:`onnxrep.cli`)."""

from onnxrep.cli import main

if __name__ == "__main__":
    main(prog_name="onnxrep")
