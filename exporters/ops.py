"""The MoORE layer as one operator: ``torch.ops.moorize.moore_linear`` and ONNX ``ai.moorize::MoORELinear``.

Exporting a routed model means every MoORELinear becomes one call of this op, whose
inputs are plain tensors another runtime can feed a fused kernel (docs/FORMAT.md,
"The ai.moorize::MoORELinear operator"). Everything constant after training is
folded at export time: the Householder chain into the rotated ``vh = Vh H`` and the
task router into a per-task gate table ``σ + A E`` ([tasks, r]); only the sample
router (C, B) depends on the token.

In ONNX the node is emitted as an opaque ``ai.moorize`` op during the torch export
(so no optimiser pass inlines it) and its function bodies are attached afterwards,
one overload per combination of present optional inputs: a body cannot branch on
whether an optional input was given. ``--decompose`` inlines those same bodies.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from ..errors import MoorizeError
from ..model.layer import MoORELinear, householder_wy, inverse_rms
from .options import MIN_OPSET

OP_DOMAIN = "ai.moorize"
OP_NAME = "MoORELinear"
OP_VERSION = 1
# name, optional?; the order is the op's input order
OP_INPUTS = (("X", False), ("task_ids", False), ("gate_table", False), ("U", False), ("vh", False),
             ("router_in", True), ("router_out", True), ("residual", True), ("bias", True), ("router_eps", True))


# ---- PyTorch -------------------------------------------------------------------------------------

def moore_linear_math(x: torch.Tensor, task_ids: torch.Tensor, gate_table: torch.Tensor, U: torch.Tensor,
                      vh: torch.Tensor, router_in: Optional[torch.Tensor], router_out: Optional[torch.Tensor],
                      residual: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                      router_eps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = U (ReLU(gate_table[t] + B (C x)) ⊙ (vh x)) (+ R x) (+ b), x [batch, seq, n]; in x's dtype.
    With ``router_eps`` (a scalar) the router sees x / sqrt(mean(x²) + eps), computed in float32.

    Plain aten ops: the custom op's kernel, and what TorchScript and .pt2 exports contain (they then
    load without moorize installed)."""
    z = x @ vh.t()
    g = gate_table[task_ids].unsqueeze(1)
    if router_in is not None:
        xc = x @ router_in.t()
        if router_eps is not None:
            xc = (xc.float() * inverse_rms(x, router_eps.float())).to(x.dtype)
        g = g + xc @ router_out.t()
    y = (z * torch.relu(g)) @ U.t()
    if residual is not None:
        y = y + x @ residual.t()
    if bias is not None:
        y = y + bias
    return y


@torch.library.custom_op("moorize::moore_linear", mutates_args=())
def moore_linear(x: torch.Tensor, task_ids: torch.Tensor, gate_table: torch.Tensor, U: torch.Tensor,
                 vh: torch.Tensor, router_in: Optional[torch.Tensor], router_out: Optional[torch.Tensor],
                 residual: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                 router_eps: Optional[torch.Tensor]) -> torch.Tensor:
    """The MoORE layer as one op (see ``moore_linear_math``); the ONNX export maps it to ai.moorize."""
    return moore_linear_math(x, task_ids, gate_table, U, vh, router_in, router_out, residual, bias, router_eps)


@moore_linear.register_fake
def _moore_linear_fake(x, task_ids, gate_table, U, vh, router_in, router_out, residual, bias, router_eps):
    return x.new_empty(*x.shape[:-1], U.shape[0])


class ExportMoORELinear(nn.Module):
    """What a MoORELinear becomes for export: the op's constant inputs as buffers, task ids from the wrapper."""

    def __init__(self, layer: MoORELinear, holder: "TaskIds", dtype: torch.dtype, fold_rotation: bool = True,
                 use_op: bool = True):
        """``fold_rotation=False`` keeps the stored Vh and the chain's WY factors (Y [n, k], T [k, k]) and
        rotates in the graph, so Vh can be the checkpoint's own bytes (``--weights reference``); a runtime
        folds that constant subgraph when it loads the model."""
        super().__init__()
        self.holder, self.use_op, self.row_dim = holder, use_op, layer.row_dim
        self.rotate = not fold_rotation and layer.householder is not None
        with torch.no_grad():  # the constants are computed as MoORELinear computes them, bit for bit
            router = layer.router.export_tensors(layer, dtype)  # gate_table, router_in, router_out, router_eps
            self.register_buffer("gate_table", router["gate_table"])
            self.register_buffer("U", layer.U.to(dtype))
            if self.rotate:
                Y, T = householder_wy(layer.householder.detach())
                self.register_buffer("Vh", layer.Vh.to(dtype))
                self.register_buffer("wy_y", Y.to(dtype).contiguous())
                self.register_buffer("wy_t", T.t().to(dtype).contiguous())
            else:
                self.register_buffer("vh", layer.inference_vh().to(dtype).contiguous())
            for name in ("router_in", "router_out", "router_eps"):
                self.register_buffer(name, router[name])
            self.register_buffer("residual", None if layer.residual is None else layer.residual.to(dtype))
            self.register_buffer("bias", None if layer.bias is None else layer.bias.to(dtype))
        # what model code reads of a linear layer's weight (T5's feed-forward casts to ``wo.weight.dtype``): its
        # dtype and shape, on the meta device, so nothing of it can enter the graph
        object.__setattr__(self, "_weight_stand_in", torch.empty(layer.out_features, layer.in_features, dtype=dtype,
                                                                 device="meta"))

    @property
    def weight(self) -> torch.Tensor:
        return self._weight_stand_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.row_dim == 1 and x.dim() > 2:  # a [sequence, batch, ...] layer (``moorize.model.layout``)
            return self._rows_first(x.transpose(0, 1)).transpose(0, 1).contiguous()
        return self._rows_first(x)

    def _rows_first(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # tokens flattened from the rows (a sparse-MoE block's shared expert)
            return self.routed(x, self.holder.token_ids)
        vh = self.Vh - ((self.Vh @ self.wy_y) @ self.wy_t) @ self.wy_y.t() if self.rotate else self.vh
        op = torch.ops.moorize.moore_linear if self.use_op else moore_linear_math
        return op(x.to(self.U.dtype), self.holder.ids, self.gate_table, self.U, vh, self.router_in, self.router_out,
                  self.residual, self.bias, self.router_eps).to(x.dtype)


    def routed(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Rows of x [tokens, n] with a task id each (sparse-MoE experts): the op with one token per row."""
        op = torch.ops.moorize.moore_linear if self.use_op else moore_linear_math
        vh = self.Vh - ((self.Vh @ self.wy_y) @ self.wy_t) @ self.wy_y.t() if self.rotate else self.vh
        return op(x.to(self.U.dtype).unsqueeze(1), task_ids, self.gate_table, self.U, vh, self.router_in,
                  self.router_out, self.residual, self.bias, self.router_eps).squeeze(1).to(x.dtype)


class TaskIds:
    """The export wrapper's ``task_ids`` input, read by every ExportMoORELinear of one model."""

    ids: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None  # the same, one per token (sparse-MoE experts see rows flattened)


@contextlib.contextmanager
def export_layers(model: nn.Module, holder: TaskIds, dtype: torch.dtype, fold_rotation: bool = True,
                  use_op: bool = True):
    """Swap every MoORELinear of ``model`` for an ExportMoORELinear for the duration of the block."""
    originals = {}
    moore = getattr(model, "moore", None)  # a dense model (export_dense_onnx) has no MoORE layers
    for path in (moore.layer_paths.values() if moore is not None else ()):
        layer = model.get_submodule(path)
        originals[path] = layer
        _set(model, path, ExportMoORELinear(layer, holder, dtype, fold_rotation, use_op))
    try:
        yield
    finally:
        for path, layer in originals.items():
            _set(model, path, layer)


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


# ---- ONNX ----------------------------------------------------------------------------------------

def onnx_schema():
    """The op's schema, handed to the torch exporter (not registered with onnx: the model ships functions)."""
    from onnx.defs import OpSchema

    opt, single = OpSchema.FormalParameterOption.Optional, OpSchema.FormalParameterOption.Single
    inputs = [OpSchema.FormalParameter(name, "tensor(int64)" if name == "task_ids" else "T",
                                       param_option=opt if optional else single)
              for name, optional in OP_INPUTS]
    return OpSchema(OP_NAME, OP_DOMAIN, OP_VERSION, inputs=inputs, outputs=[OpSchema.FormalParameter("Y", "T")],
                    type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "activations and weights")])


def onnx_translation():
    """custom_translation_table entry: the torch op becomes one opaque ai.moorize::MoORELinear node."""
    import onnxscript

    op = onnxscript.values.Op(onnxscript.values.Opset(OP_DOMAIN, OP_VERSION), OP_NAME, onnx_schema())

    def moore_linear_onnx(x, task_ids, gate_table, U, vh, router_in=None, router_out=None, residual=None,
                          bias=None, router_eps=None):
        return op(x, task_ids, gate_table, U, vh, router_in, router_out, residual, bias, router_eps)

    return {torch.ops.moorize.moore_linear.default: moore_linear_onnx}


def overload_of(present: set[str]) -> str:
    """Function overload for the optional inputs a node has: 'base', 'sample', 'sample_rms_residual_bias', ..."""
    parts = [p for p, names in (("sample", ("router_in", "router_out")), ("rms", ("router_in", "router_eps")),
                                ("residual", ("residual",)), ("bias", ("bias",))) if all(n in present for n in names)]
    return "_".join(parts) or "base"


def function_proto(overload: str, opset: int):
    """The ONNX function body of one overload, in standard ops of ``opset`` (the model's)."""
    from onnx import helper

    parts = set(overload.split("_"))
    nodes = []

    def node(op_type, inputs, output, **attrs):
        nodes.append(helper.make_node(op_type, inputs, [output], **attrs))
        return output

    T = lambda name: node("Transpose", [name], f"{name}_t", perm=[1, 0])  # noqa: E731 (weights [out, in])
    z = node("MatMul", ["X", T("vh")], "z")
    axis = node("Constant", [], "axis1", value=helper.make_tensor("axis1", 7, [1], [1]))
    gate = node("Unsqueeze", [node("Gather", ["gate_table", "task_ids"], "gate_rows", axis=0), axis], "gate_task")
    if "sample" in parts:
        xc = node("MatMul", ["X", T("router_in")], "xc")
        if "rms" in parts:  # xc / sqrt(mean(x²) + eps), the statistic in float32 (x² overflows float16)
            xf = node("Cast", ["X"], "x_f32", to=1)
            last = node("Constant", [], "axis_last", value=helper.make_tensor("axis_last", 7, [1], [-1]))
            ms = node("ReduceMean", [node("Mul", [xf, xf], "x_sq"), last], "x_ms", keepdims=1)
            eps = node("Cast", ["router_eps"], "eps_f32", to=1)
            inv = node("Reciprocal", [node("Sqrt", [node("Add", [ms, eps], "x_ms_eps")], "x_rms")], "x_inv_rms")
            xc = node("CastLike", [node("Mul", [node("Cast", [xc], "xc_f32", to=1), inv], "xc_norm_f32"), "X"],
                      "xc_norm")
        gate = node("Add", [gate, node("MatMul", [xc, T("router_out")], "gate_sample")], "gate_sum")
    zg = node("Mul", [z, node("Relu", [gate], "g")], "zg")
    y = node("MatMul", [zg, T("U")], "y_experts")
    if "residual" in parts:
        y = node("Add", [y, node("MatMul", ["X", T("residual")], "y_residual")], "y_with_residual")
    if "bias" in parts:
        y = node("Add", [y, "bias"], "y_with_bias")
    nodes.append(helper.make_node("Identity", [y], ["Y"]))
    return helper.make_function(OP_DOMAIN, OP_NAME, [name for name, _ in OP_INPUTS], ["Y"], nodes, [helper.make_opsetid("", opset)],
                                doc_string=f"MoORE layer, version {OP_VERSION}, overload {overload} "
                                           "(docs/FORMAT.md)", overload=overload)


def layers_in_graph(model) -> int:
    """How many distinct MoORE layers the graph's nodes are: nodes that share their factors (one module called by
    several blocks) are one layer."""
    u = [name for name, _ in OP_INPUTS].index("U")
    return len({node.input[u] for node in model.graph.node if node.domain == OP_DOMAIN and node.op_type == OP_NAME})


def attach_functions(model, opset: int) -> int:
    """Give every MoORELinear node its overload and the model the matching function bodies; returns the count."""
    from onnx import helper

    if opset < MIN_OPSET:
        raise MoorizeError(f"opset {opset} is too old: the exporter and the {OP_DOMAIN}::{OP_NAME} function "
                           f"need opset >= {MIN_OPSET}")
    names = [name for name, _ in OP_INPUTS]
    used = set()
    count = 0
    for node in model.graph.node:
        if node.domain != OP_DOMAIN or node.op_type != OP_NAME:
            continue
        present = {names[i] for i, v in enumerate(node.input) if v}
        node.overload = overload_of(present)  # inputs keep their positions; absent ones are ""
        used.add(node.overload)
        count += 1
    del model.functions[:]
    model.functions.extend(function_proto(o, opset) for o in sorted(used))
    if not any(o.domain == OP_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(OP_DOMAIN, OP_VERSION))
    return count
