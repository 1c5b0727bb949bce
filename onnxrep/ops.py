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

CONCAT = "Concat"
FLATTEN = "Flatten"
RESHAPE = "Reshape"
MAX_POOL = "MaxPool"
GLOBAL_AVERAGE_POOL = "GlobalAveragePool"
GLOBAL_MAX_POOL = "GlobalMaxPool"
PRELU = "PRelu"
CLIP = "Clip"
CAST = "Cast"
MAX = "Max"
MIN = "Min"

#: Element-wise ops of one float input with no per-channel parameters (activations).
UNARY_ACTIVATIONS = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "Softplus", "Softsign", "HardSigmoid",
    "HardSwish", "Erf", "Neg", "Abs", "Exp", "Gelu", "Mish", CLIP, CAST,
})

#: Binary ops whose output is a sum of its inputs (Sub with the second one negated).
SUM_OPS = frozenset({ADD, SUB})
#: Ops that apply a per-channel affine map when their other operand is a constant.
AFFINE_BINARY_OPS = frozenset({ADD, SUB, MUL, DIV})

DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
