"""ONNX operator names used by onnxrep, in one place."""

ADD = "Add"
SUB = "Sub"
MUL = "Mul"
DIV = "Div"
CONV = "Conv"
BATCH_NORM = "BatchNormalization"
AVERAGE_POOL = "AveragePool"
IDENTITY = "Identity"
CONSTANT = "Constant"
GEMM = "Gemm"
MATMUL = "MatMul"

#: Binary ops whose output is a sum of its inputs (Sub with the second one negated).
SUM_OPS = frozenset({ADD, SUB})
#: Ops that apply a per-channel affine map when their other operand is a constant.
AFFINE_BINARY_OPS = frozenset({ADD, SUB, MUL, DIV})

DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
