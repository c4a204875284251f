"""Lookup tables for elementwise chains on quantized tensors: every function of one uint8/int8 tensor becomes one
gather from a 256-entry table.

A QDQ model keeps its activations quantized between the ops that ONNX Runtime runs as QLinear kernels, so an
activation function decomposed into elementwise ops is a chain of dequantize → float op → quantize steps on
one int8 tensor. A GELU (x·½·(1 + erf(x/√2)), as exported) after an int8 conv reads, in the Relax module:

    q  = quantize(conv)                                    (the int8 layer's requantized output, uint8)
    e  = quantize(erf(dequantize(q) / √2))                 uint8
    a  = quantize(dequantize(e) + 1)                       uint8
    m  = quantize(dequantize(q) · dequantize(a))           uint8
    y  = quantize(dequantize(m) · ½)                       uint8

Every value in the chain is a function of q alone, and q takes 256 values: `y = take(T, q)` with
T = chain(every value of q). The table is what ONNX Runtime computes for the chain: the chain is written back as
the ONNX ops it was imported from (`ONNX_OPS`) and run once, at compile time, on the 256 values (one session for
all the model's tables). So these parts of the model compute what ONNX Runtime computes for them (its QLinearAdd /
QLinearMul fusions included), on every target; without the tables TVM computes them in float32 with its own erf
and fused multiply-adds and lands on the other side of a rounding boundary now and then (ppocrv6_tiny_det,
8 images: values identical to ONNX Runtime's int8 output 1 % → 35 %, relative L2 difference 0.144 → 0.082;
ONNX Runtime's own optimized vs unoptimized graphs differ by 0.145). And they are faster: the 1×1 convs with a
GELU epilogue on ppocrv6_tiny_det's 80×80 maps took 0.77 ms each in int8 (four quantize/dequantize pairs, an erf
and three arithmetic ops per element) against 0.44 ms for the float conv with its fused GELU; with the table
looked up in the conv's epilogue, 0.33 ms. On a CPU with AVX-512 VBMI the lookup is two byte permutes per
vector (`vector_lookups`, run after TVM's TIR lowering): LLVM loads a byte gather lane by lane.

A chain qualifies when every op in it is an elementwise op of `ONNX_OPS`, every other operand is a one-value
constant (per-tensor scales and zero points, scalars, a quantized scalar's dequantize), every value has q's
shape, and what a reader outside the chain uses holds enough work to be worth a gather (`MIN_COST`; a lone
dequantize → relu is left as it is; where byte tables are permutes, `MIN_COST_PERMUTED`: a requantize to another
scale too, squeezenet int8 2.68 → 2.60 ms, det 4.81 → 4.75, layout within noise, outputs identical). Its result
may be quantized (a uint8/int8 table) or float (a float32 table: the sigmoid of a detector's probability map).
"""
from __future__ import annotations

import numpy as np

from .common import static_shape
from .simd import cpu_features, is_cpu

#: the elementwise Relax ops a chain may hold, as the ONNX ops that compute its table
ONNX_OPS = {"relax.erf": "Erf", "relax.tanh": "Tanh", "relax.sigmoid": "Sigmoid", "relax.exp": "Exp",
            "relax.log": "Log", "relax.sqrt": "Sqrt", "relax.negative": "Neg", "relax.abs": "Abs",
            "relax.nn.relu": "Relu", "relax.floor": "Floor", "relax.ceil": "Ceil", "relax.clip": "Clip",
            "relax.astype": "Cast", "relax.add": "Add", "relax.subtract": "Sub", "relax.multiply": "Mul",
            "relax.divide": "Div", "relax.power": "Pow", "relax.maximum": "Max", "relax.minimum": "Min",
            "relax.quantize": "QuantizeLinear", "relax.dequantize": "DequantizeLinear"}
QDQ = ("relax.quantize", "relax.dequantize")
EXPENSIVE = ("relax.erf", "relax.tanh", "relax.sigmoid", "relax.exp", "relax.log", "relax.sqrt", "relax.power",
             "relax.divide")
#: work (in cheap elementwise ops) a chain must hold to be replaced: a gather costs a few vector ops per element
MIN_COST = 6
#: the same where a byte table is read with permutes (`vector_lookups`, AVX-512 VBMI): a requantize to another
#: scale (dequantize → quantize, squeezenet's expand convs writing at their concat's scale) is worth a lookup
MIN_COST_PERMUTED = 4
LOOKUP = "squeeze.lookup"  #: PrimFunc attribute of the table lookups (`legalize_lookup`)
#: what an op counts towards MIN_COST
COST = {"relax.quantize": 3, "relax.dequantize": 1, "relax.astype": 0, **{op: 6 for op in EXPENSIVE}}


def lookup_tables(func):
    """`func` (a Relax function) with every qualifying chain's result read from a table."""
    from tvm import relax  # noqa: PLC0415
    from tvm.relax.dpl import is_op, rewrite_call, wildcard  # noqa: PLC0415

    import tvm  # noqa: PLC0415
    chains = _chains(func, _has_vbmi(tvm.target.Target.current(allow_none=True)))
    if not chains:
        return func
    tables = _evaluate(chains)
    by_value = [(chain.value, chain.source, table) for chain, table in zip(chains, tables) if table is not None]
    if not by_value:
        return func

    def rewrite(orig, _matches):
        for value, source, table in by_value:
            if orig.same_as(value):  # table row i holds the value at q = i + min (int8: −128)
                index = relax.op.astype(source, "int32")
                low = int(np.iinfo(np.dtype(str(source.ty.dtype))).min)
                if low:
                    index = relax.op.subtract(index, relax.const(np.int32(low)))
                # "clip": the index is in range by construction; "fast" would say it is not checked, per layer
                return relax.op.take(relax.const(table), index, axis=0, mode="clip")
        return orig

    pattern = None
    for op, arity in sorted({(str(v.op.name), len(v.args)) for v, _, _ in by_value}):
        one = is_op(op)(*[wildcard() for _ in range(arity)])
        pattern = one if pattern is None else pattern | one
    return rewrite_call(pattern, rewrite, func)


class _Chain:
    """One replaced value: the Relax call `value` (bound to `var`), a function of `source` through `cone`."""

    def __init__(self, var, value, source, cone: list, bindings: dict):
        self.var, self.value, self.source, self.cone, self.bindings = var, value, source, cone, bindings

    @property
    def dtype(self) -> str:
        return str(self.source.ty.dtype)

    def onnx_nodes(self, name: str, source: str) -> tuple[list, list]:
        """The chain as ONNX nodes reading `source` (every value of the source's dtype) and writing `name`,
        with their initializers; NotImplementedError for an op or attribute it cannot spell."""
        from onnx import helper, numpy_helper  # noqa: PLC0415
        from tvm import relax  # noqa: PLC0415
        nodes, inits = [], []
        names = {self.source: source}

        def operand(arg, like: str = "float32") -> str:
            if isinstance(arg, relax.Var):
                return names[arg]
            value = arg.value.numpy() if hasattr(arg.value, "numpy") else np.asarray(arg.value, np.dtype(like))
            inits.append(numpy_helper.from_array(np.asarray(value).reshape(()), f"{name}_c{len(inits)}"))
            return inits[-1].name
        for i, var in enumerate(self.cone):
            call = self.bindings[var]
            op = ONNX_OPS.get(str(call.op.name))
            if op is None:
                raise NotImplementedError(str(call.op.name))
            out = name if var.same_as(self.var) else f"{name}_{i}"
            attrs = {}
            if op == "QuantizeLinear":
                dtype = np.dtype(str(call.attrs.out_dtype))
                zero = call.args[2].value.numpy().astype(dtype)
                inputs = [operand(call.args[0]), operand(call.args[1]),
                          operand(relax.const(zero.reshape(())))]
            elif op == "DequantizeLinear":
                if str(call.attrs.out_dtype) != "float32":
                    raise NotImplementedError("dequantize to " + str(call.attrs.out_dtype))
                inputs = [operand(a) for a in call.args]
            elif op == "Cast":
                attrs["to"] = helper.np_dtype_to_tensor_dtype(np.dtype(str(call.attrs.dtype)))
                inputs = [operand(call.args[0])]
            else:
                like = str(var.ty.dtype)
                inputs = [operand(a, like) for a in call.args]
            nodes.append(helper.make_node(op, inputs, [out], **attrs))
            names[var] = out
        return nodes, inits


def _chains(func, permuted: bool = False) -> list[_Chain]:
    """The values to replace, in binding order: for each, its source tensor and the bindings it depends on.
    `permuted`: byte tables are read with permutes (`MIN_COST_PERMUTED` for a chain with an 8-bit result)."""
    from tvm import relax  # noqa: PLC0415
    bindings: dict = {}
    order: list = []
    for block in func.body.blocks:
        for binding in block.bindings:
            if isinstance(binding, relax.VarBinding):
                bindings[binding.var] = binding.value
                order.append(binding.var)
    source: dict = {}      # derived var → the one integer tensor it is a function of
    constant: set = set()  # vars computed from constants alone, one value (a quantized scalar's dequantize)
    deps: dict = {}        # derived or constant var → the derived or constant vars it reads
    for var in order:
        root = _derived_root(bindings[var], var, source, constant)
        if root is _CONSTANT:
            constant.add(var)
        elif root is not None:
            source[var] = root
        else:
            continue
        deps[var] = [a for a in bindings[var].args if isinstance(a, relax.Var) and (a in source or a in constant)]
    outside = _read_outside(func, bindings, order, source)
    chains = []
    for var in order:
        if var not in source or var not in outside:
            continue
        cone = _cone(var, deps)
        bound = MIN_COST_PERMUTED if permuted and str(var.ty.dtype) in ("uint8", "int8") else MIN_COST
        if sum(COST.get(str(bindings[v].op.name), 1) for v in cone if v not in constant) >= bound:
            chains.append(_Chain(var, bindings[var], source[var], cone, bindings))
    return chains


_CONSTANT = object()


def _derived_root(value, var, source: dict, constant: set):
    """The integer tensor `value` is an elementwise function of, `_CONSTANT` when it is a one-value function of
    constants, None when it is neither."""
    from tvm import ir, relax  # noqa: PLC0415
    if not isinstance(value, relax.Call) or not isinstance(value.op, ir.Op):
        return None
    name = str(value.op.name)
    if name not in ONNX_OPS:
        return None
    roots = set()
    for arg in value.args:
        if isinstance(arg, ir.GenericConst):
            if arg.value.numpy().size != 1:
                return None
        elif isinstance(arg, ir.expr.Constant):   # an immediate: clip's bounds
            continue
        elif isinstance(arg, relax.Var):
            if arg in constant:
                continue
            if arg in source:
                roots.add(source[arg])
            elif _integer_tensor(arg):
                roots.add(arg)
            else:
                return None
        else:
            return None
    if not roots:
        shape = static_shape(var)
        return _CONSTANT if shape is not None and int(np.prod(shape)) == 1 else None
    if len(roots) != 1:
        return None
    root = next(iter(roots))
    if name in QDQ and not all(isinstance(a, ir.GenericConst) for a in value.args[1:]):
        return None
    return root if _same_shape(var, root) else None


def _integer_tensor(var) -> bool:
    from tvm import relax  # noqa: PLC0415
    info = var.ty
    return isinstance(info, relax.TensorType) and str(info.dtype) in ("uint8", "int8")


def _same_shape(a, b) -> bool:
    shape = static_shape(a)
    return shape is not None and shape == static_shape(b)


def _read_outside(func, bindings: dict, order: list, source: dict) -> set:
    """Derived vars that something other than a derived binding reads (or the function returns)."""
    from tvm import relax  # noqa: PLC0415
    found = set()

    def visit(expr):
        if isinstance(expr, relax.Var):
            if expr in source:
                found.add(expr)
        elif isinstance(expr, relax.Call):
            for a in expr.args:
                visit(a)
        elif isinstance(expr, relax.Tuple):
            for f in expr.fields:
                visit(f)
        elif isinstance(expr, relax.TupleGetItem):
            visit(expr.tuple_value)
    for var in order:
        if var not in source:
            visit(bindings[var])
    visit(func.body.body)
    return found


def _cone(var, deps: dict) -> list:
    """`var` and the derived vars it depends on, in dependency order."""
    seen: dict = {}

    def walk(v):
        if v in seen:
            return
        for d in deps.get(v, []):
            walk(d)
        seen[v] = True
    walk(var)
    return list(seen)


def _evaluate(chains: list[_Chain]) -> list[np.ndarray | None]:
    """Each chain's value at every value of its source, computed by ONNX Runtime on the chain as ONNX ops (one
    session for all of them); None for a chain it cannot spell."""
    import onnxruntime as ort  # noqa: PLC0415
    from onnx import helper  # noqa: PLC0415
    nodes, inits, outputs, spelled = [], [], [], []
    sources = {}
    for i, chain in enumerate(chains):
        source = sources.setdefault(chain.dtype, f"all_{chain.dtype}")
        try:
            more, consts = chain.onnx_nodes(f"t{i}", source)
        except NotImplementedError:
            spelled.append(False)
            continue
        nodes += more
        inits += consts
        outputs.append(helper.make_tensor_value_info(f"t{i}", helper.np_dtype_to_tensor_dtype(
            np.dtype(str(chain.var.ty.dtype))), None))
        spelled.append(True)
    if not outputs:
        return [None] * len(chains)
    inputs = [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), [256])
              for dtype, name in sources.items()]
    model = helper.make_model(helper.make_graph(nodes, "tables", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {name: _all_values(dtype) for dtype, name in sources.items()}
    values = iter(session.run(None, feed))
    return [np.ascontiguousarray(next(values).reshape(256)) if ok else None for ok in spelled]


def _all_values(dtype: str) -> np.ndarray:
    """Every value of an 8-bit integer type, in table order (row i holds the value at i + min)."""
    info = np.iinfo(np.dtype(dtype))
    return np.arange(info.min, info.max + 1, dtype=dtype)


def legalize_lookup(bb, call):
    """relax.take of a table (a 1-D constant of at most 256 entries, mode "clip": what `lookup_tables` writes) as
    a compute that `lookups_elementwise_pass` marks elementwise, so FuseOps puts the lookup into the epilogue of
    the int8 layer that writes its index (TOPI's take is opaque: a separate pass over the map, the int32 index
    written out and read back); any other take as TVM legalizes it."""
    from tvm import te, tirx  # noqa: PLC0415
    from .common import default_legalization  # noqa: PLC0415
    table, index = call.args
    shape = static_shape(table)
    if not (hasattr(table, "value") and shape is not None and len(shape) == 1 and shape[0] <= 256
            and str(call.attrs.mode) == "clip" and int(call.attrs.axis) == 0
            and str(index.ty.dtype).startswith(("int", "uint"))):
        return default_legalization("relax.take")(bb, call)
    last = shape[0] - 1

    def lookup(t, i):
        return te.compute(i.shape, lambda *ax: t[tirx.max(tirx.min(i(*ax).astype("int32"), last), 0)],
                          name="lookup")
    return bb.call_te(lookup, table, index, primfunc_name_hint="lookup", primfunc_attrs={LOOKUP: 1})


def lookups_elementwise_pass():
    """A module pass run after AnnotateTIROpPattern: the lookups `legalize_lookup` wrote are elementwise in their
    index (the table is a constant operand), so FuseOps may put them into an int8 conv's epilogue, which takes
    only elementwise consumers. (AnnotateTIROpPattern reads the table's data-dependent load as opaque, and treats
    an op_pattern of 0, elementwise, as unset.)"""
    import tvm  # noqa: PLC0415

    @tvm.transform.module_pass(opt_level=0, name="SqueezeLookupsElementwise")
    def _pass(mod, _ctx):
        out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        for gv, func in mod.functions.items():
            if isinstance(func, tvm.tirx.PrimFunc) and func.attrs is not None and LOOKUP in func.attrs:
                out[gv] = func.with_attr("op_pattern", 0)
        return out
    return _pass



# ---------------------------------------------------------------------------------------------- vector lookups

#: the table a vector lookup reads in one instruction pair: two `vpermi2b` over 128 entries each
BYTE_TABLE = 256
VPERMI2B = "llvm.x86.avx512.vpermi2var.qi.512"
#: AVX-512 gathers of 16 32-bit lanes at 32-bit indices (passthrough, base, index, i16 mask, scale)
GATHER_32 = {"float32": "llvm.x86.avx512.gather.dps.512", "int32": "llvm.x86.avx512.gather.dpi.512"}


def vector_lookups(func, vbmi: bool, avx512: bool = False):
    """`func` (lowered, vectorized TIR) with its vector gathers as vector instructions. LLVM compiles a vector
    load at a non-contiguous index to one scalar load and insert per lane (TVM writes no gather instruction).

    `vbmi` (the target has AVX-512 VBMI): each gather from a 256-entry byte table becomes byte permutes: the
    index bytes widened to 64 lanes, `vpermi2b` over entries 0-127 and over 128-255, the half chosen by the
    index's top bit, the first lanes kept (x86 has no byte gather: 2 instructions per element, 13 % of
    ppocrv6_tiny_det's int8 time in its table epilogues). Exact: the permutes read the same table entries for
    every index a 256-entry buffer can be read at.

    `avx512`: each gather of 8 or 16 float32/int32 lanes at an int32 index becomes one `vgatherdps`/`vpgatherdd`
    (8 lanes: the index repeated to 16, the first 8 kept, the same addresses read; a multiple of 16 lanes: one
    per 16). The float tables of int8 epilogues (an SE gate's hard sigmoid, `(dequantize(e) + 1)·½` of a GELU
    whose conv output stays float) were read lane by lane (vpextrd + vinsertps, both on one port): the GELU
    layer of ppocrv6_tiny_det int8 0.28 → 0.17 ms at 1 thread."""
    if not (vbmi or avx512):
        return func
    import tvm  # noqa: PLC0415
    from tvm import tirx  # noqa: PLC0415
    from tvm_ffi import structural_mutate  # noqa: PLC0415

    def lanes_of(expr, lanes: int):
        return tirx.Shuffle([expr], [tirx.IntImm("int32", i) for i in range(lanes)])

    def bytes_(load, buffer, lanes: int, index):
        vec = f"{load.ty.dtype.with_lanes(1)}x64"
        wide = tirx.Cast(f"uint8x{lanes}", index)
        wide = tirx.Shuffle([wide] * -(-64 // lanes), [tirx.IntImm("int32", i) for i in range(64)])
        step = str(index.ty.dtype.with_lanes(1))
        rows = [tirx.BufferLoad(buffer, [tirx.Ramp(tirx.IntImm(step, 64 * i), tirx.IntImm(step, 1), 64)])
                for i in range(4)]
        low = tirx.call_llvm_pure_intrin(vec, VPERMI2B, rows[0], wide, rows[1])
        high = tirx.call_llvm_pure_intrin(vec, VPERMI2B, rows[2], wide, rows[3])
        picked = tirx.Select(wide >= tirx.Broadcast(tirx.IntImm("uint8", 128), 64), high, low)
        return picked if lanes == 64 else lanes_of(picked, lanes)

    def words(load, buffer, lanes: int, index):
        scalar = str(load.ty.dtype.with_lanes(1))
        if lanes == 8:
            index = tirx.Shuffle([index, index], [tirx.IntImm("int32", i) for i in range(16)])
        zero = tirx.FloatImm(scalar, 0.0) if scalar == "float32" else tirx.IntImm(scalar, 0)
        base = tirx.address_of(tirx.BufferLoad(buffer, [tirx.IntImm(str(buffer.shape[0].ty.dtype), 0)]))

        def gather(part):
            return tirx.call_llvm_pure_intrin(f"{scalar}x16", GATHER_32[scalar], tirx.Broadcast(zero, 16), base,
                                              part, tirx.IntImm("int16", -1), tirx.IntImm("int32", 4))
        if lanes <= 16:
            return gather(index) if lanes == 16 else lanes_of(gather(index), lanes)
        parts = [gather(tirx.Shuffle([index], [tirx.IntImm("int32", i) for i in range(start, start + 16)]))
                 for start in range(0, lanes, 16)]  # a wider vector (an epilogue over two column vectors)
        return tirx.Shuffle(parts, [tirx.IntImm("int32", i) for i in range(lanes)])

    def rewrite(load, mutator):
        load = mutator.default_mutate(load)
        dtype, buffer = load.ty.dtype, load.source
        if not (dtype.lanes > 1 and len(buffer.shape) == 1 and len(load.indices) == 1
                and not isinstance(load.indices[0], tirx.Ramp) and load.indices[0].ty.dtype.lanes == dtype.lanes
                and getattr(load, "predicate", None) is None):
            return load
        lanes, index = int(dtype.lanes), load.indices[0]
        if (vbmi and lanes <= 64 and dtype.bits == 8 and isinstance(buffer.shape[0], tirx.IntImm)
                and int(buffer.shape[0]) == BYTE_TABLE):
            return bytes_(load, buffer, lanes, index)
        if (avx512 and (lanes == 8 or lanes % 16 == 0) and str(dtype.with_lanes(1)) in GATHER_32
                and str(index.ty.dtype.with_lanes(1)) == "int32"):
            return words(load, buffer, lanes, index)
        return load

    return func.with_body(structural_mutate(func.body, [(tvm.ir.TensorLoad, rewrite)]))


def vector_lookups_pass():
    """`vector_lookups` as a TIR module pass, for the functions whose target has AVX-512 (VBMI for byte tables)
    (run after TVM's lowering pipeline: the loads are vectorized then)."""
    import tvm  # noqa: PLC0415

    @tvm.transform.module_pass(opt_level=0, name="SqueezeVectorLookups")
    def _pass(mod, _ctx):
        out = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        for gv, func in mod.functions.items():
            if isinstance(func, tvm.tirx.PrimFunc):
                target = func.attrs.get("target") if func.attrs else None
                out[gv] = vector_lookups(func, _has_vbmi(target), _has_avx512(target))
        return out
    return _pass


def _has_vbmi(target) -> bool:
    return is_cpu(target) and "avx512vbmi" in cpu_features(target)


def _has_avx512(target) -> bool:
    return is_cpu(target) and "avx512f" in cpu_features(target)
