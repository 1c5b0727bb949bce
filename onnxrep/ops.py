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

SHAPE = "Shape"
SIZE = "Size"
#: Ops whose output is drawn at random (Dropout: its mask), never folded into a constant.
NONDETERMINISTIC = frozenset({
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout",
})

# Ops of the decompositions that runtimes fuse into one kernel (passes/_fusions.py), and the
# fused ops' names (for messages).
ERF = "Erf"
TANH = "Tanh"
SIGMOID = "Sigmoid"
HARD_SIGMOID = "HardSigmoid"
RELU = "Relu"
POW = "Pow"
SQRT = "Sqrt"
EXP = "Exp"
NEG = "Neg"
REDUCE_MEAN = "ReduceMean"
FUSED_GELU = "Gelu"
FUSED_FAST_GELU = "FastGelu"
FUSED_QUICK_GELU = "QuickGelu"
FUSED_LAYER_NORM = "LayerNormalization"
FUSED_SIMPLIFIED_LAYER_NORM = "SimplifiedLayerNormalization"
FUSED_HSWISH = "HSwish"
FUSED_HSIGMOID = "HSigmoid"
FUSED_SWISH = "Swish"

# region checks (onnxrep/regions.py): ops that are affine maps of their data inputs, and the ops
# whose output does not depend on their inputs' values
CONV_TRANSPOSE = "ConvTranspose"
PAD = "Pad"
TRANSPOSE = "Transpose"
SQUEEZE = "Squeeze"
UNSQUEEZE = "Unsqueeze"
SLICE = "Slice"
SPLIT = "Split"
EXPAND = "Expand"
TILE = "Tile"
GATHER = "Gather"
REDUCE_SUM = "ReduceSum"
SUM = "Sum"
MEAN = "Mean"
CONSTANT_OF_SHAPE = "ConstantOfShape"
DEPTH_TO_SPACE = "DepthToSpace"
SPACE_TO_DEPTH = "SpaceToDepth"
IF = "If"
LOOP = "Loop"
SCAN = "Scan"

# spellings that the normalize-* passes rewrite into the forms the folds match
CAST_LIKE = "CastLike"

LP_POOL = "LpPool"

#: Discrete selections (verification): a rounding-level difference in their inputs can flip their
#: result where two candidates tie.
TOPK = "TopK"
ARGMAX = "ArgMax"
ARGMIN = "ArgMin"
NON_MAX_SUPPRESSION = "NonMaxSuppression"
COMPARISONS = frozenset({"Greater", "Less", "Equal", "GreaterOrEqual", "LessOrEqual"})
SELECTION_OPS = frozenset({TOPK, ARGMAX, ARGMIN, NON_MAX_SUPPRESSION}) | COMPARISONS
# region checks: scatters with constant indices are affine in their data and updates
SCATTER_ND = "ScatterND"
SCATTER_ELEMENTS = "ScatterElements"

#: Ops whose onnx shape inference gives what onnxruntime computes (element-wise ops, Conv, BN,
#: linear layers, Concat, Flatten, global pools, Transpose) or whose output shape onnxrep recomputes
#: with onnxruntime's formula (the windowed pools): a model of these only need not run in
#: onnxruntime for its shapes (onnxrep.cost).
SHAPE_INFERENCE_AGREES = UNARY_ACTIVATIONS | AFFINE_BINARY_OPS | frozenset({
    CONV, BATCH_NORM, GEMM, MATMUL, CONCAT, FLATTEN, GLOBAL_AVERAGE_POOL, GLOBAL_MAX_POOL, IDENTITY,
    CONSTANT, TRANSPOSE, MAX, MIN, PRELU, POW, SQRT, RELU, SIGMOID, TANH, HARD_SIGMOID,
    MAX_POOL, AVERAGE_POOL, LP_POOL,
})

# normalize-activations (passes/normalize_activations.py): the standard ops a decomposition becomes
GELU = "Gelu"
HARD_SWISH = "HardSwish"
