"""Every stage of the pipeline, run on one family of ``families.py``: what the support matrix (docs/SUPPORT.md,
``scripts/support_matrix.py``) records and what ``tests/test_support.py`` holds each family to.

A stage ends in one of three ways: it works and its check holds (``ok``); moorize refuses it with a one-line
``MoorizeError`` that names the reason (``refused``); or anything else (``error``: a bug, which the matrix must
never show). A stage after a failed one is not run (``—``).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

STAGES = ("convert", "load", "train", "export", "with_past", "run")
TASKS = ["a", "b"]


@dataclass
class Cell:
    status: str  # "ok" | "refused" | "error" | "n/a" | "skipped"
    detail: str = ""

    def mark(self) -> str:
        return {"ok": "✓", "refused": "refused", "error": "ERROR", "n/a": "n/a", "skipped": "—"}[self.status]


def _output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _stage(fn) -> Cell:
    from moorize.errors import MoorizeError

    try:
        detail = fn()
    except MoorizeError as e:
        text = str(e)
        return Cell("refused" if "\n" not in text else "error", text.splitlines()[0] if text else "")
    except Exception as e:  # a bug: the matrix says so, with where it happened
        where = traceback.extract_tb(e.__traceback__)[-1]
        return Cell("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                             f"({Path(where.filename).name}:{where.lineno})")
    return Cell("ok", detail or "")


def run_family(fam, root: Path) -> dict[str, Cell]:
    """Every stage of ``fam`` in ``root`` (a fresh directory): convert, load, one training step, export, export
    with the KV cache, and ONNX Runtime against PyTorch."""
    from helpers import perturb

    import moorize
    from moorize.exporters.onnx import export_onnx
    from moorize.runtime import MoOREOrtModel

    cells: dict[str, Cell] = {}
    model = fam.build()
    inputs = fam.example_inputs(model)
    src, out, ad = root / "hf", root / "factored", root / "adapter"
    model.save_pretrained(src)
    state: dict = {}
    decoder = fam.inputs == "ids" and model.can_generate()
    seq2seq = fam.inputs == "seq2seq"

    def convert():
        report = moorize.convert(src, out)
        if not report.layers or report.worst_rel_error >= 1e-5:
            raise AssertionError(f"worst relative error {report.worst_rel_error:.2e} over {len(report.layers)} layers")
        return f"{len(report.layers)} layers"

    def load():
        with torch.no_grad():
            ref, got = _output(model(**inputs)), _output(moorize.load(out)(**inputs))
        diff = (got - ref).abs().max().item()
        if diff > 1e-4:
            raise AssertionError(f"max difference {diff:.2e} from the original")
        return f"max diff {diff:.1e}"

    def train():
        routed = moorize.load(out, tasks=TASKS, router="task+sample")
        params = moorize.prepare_for_training(routed)
        rows = inputs[next(iter(inputs))].shape[0]
        loss = _output(routed(**inputs, task_ids=(TASKS * rows)[:rows])).float().pow(2).mean()
        loss.backward()
        if not torch.isfinite(loss) or not any(p.grad is not None and p.grad.abs().sum() > 0 for p in params):
            raise AssertionError("no finite loss with a gradient on the MoORE parameters")
        routed.zero_grad(set_to_none=True)
        perturb(routed, seed=1)
        moorize.save_adapter(routed, ad)
        state["routed"] = routed
        return f"{len(params)} tensors"

    def export():
        report = export_onnx(out, root / "onnx", ad)
        if report.validation is None or not report.validation.ok:
            raise AssertionError("validation against PyTorch failed")
        return f"{report.moore_nodes} MoORE nodes"

    def with_past():
        report = export_onnx(out, root / "onnx-past", ad, with_past=True)
        if report.validation is None or not report.validation.ok:
            raise AssertionError("validation against PyTorch failed")
        return "validated"

    def run():
        if fam.inputs == "pixels":  # the image encoder's session against the routed model, a task per image
            ort = MoOREOrtModel.from_export(root / "onnx")
            got = ort.image_features(inputs["pixel_values"].numpy(), task=TASKS)
            with torch.no_grad():
                want = _output(state["routed"](**inputs, task_ids=TASKS)).numpy()
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
            return "ONNX Runtime equals PyTorch"
        ids = inputs["input_ids"]
        # generation runs the export with past, or the one without where a cache cannot be exported (lfm2)
        generating = root / ("onnx-past" if cells["with_past"].status == "ok" else "onnx")
        if seq2seq:  # the encoder once, then the decoder on its caches; PyTorch's greedy generate as reference
            ort = MoOREOrtModel.from_export(generating)
            mask = inputs["attention_mask"].clone()
            mask[1, -2:] = 0  # a padded row: the cross-attention mask matters
            got = ort.generate_ids(ids.numpy(), mask.numpy(), task=TASKS, max_new_tokens=4)
            with torch.no_grad():
                want = state["routed"].eval().generate(ids, attention_mask=mask, task_ids=TASKS, max_new_tokens=4,
                                                       do_sample=False, num_beams=1)[:, 1:]
            np.testing.assert_array_equal(got, want.numpy()[:, :got.shape[1]])
            return "greedy tokens equal"
        if not decoder:  # the encoder's session against the routed model, each row with its own task
            ort = MoOREOrtModel.from_export(root / "onnx")
            got = ort.run(ids.numpy(), inputs["attention_mask"].numpy(), np.array([0, 1]))[0]
            with torch.no_grad():
                want = _output(state["routed"](**inputs, task_ids=TASKS)).numpy()
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
            return "ONNX Runtime equals PyTorch"
        ort = MoOREOrtModel.from_export(generating)
        got = ort.generate_ids(ids.numpy(), task=TASKS, max_new_tokens=4)
        with torch.no_grad():
            want = state["routed"].generate(ids, attention_mask=torch.ones_like(ids), task_ids=TASKS,
                                            max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                            pad_token_id=0)[:, ids.shape[1]:]
        np.testing.assert_array_equal(got, want.numpy()[:, :got.shape[1]])
        return "greedy tokens equal"

    steps = {"convert": convert, "load": load, "train": train, "export": export, "with_past": with_past,
             "run": run}
    failed = False
    for name in STAGES:
        if name == "with_past" and not (decoder or seq2seq):
            cells[name] = Cell("n/a", "not a decoder")
            continue
        if name == "run" and not decoder and cells["export"].status != "ok":
            cells[name] = Cell("skipped")
            continue
        if failed:
            cells[name] = Cell("skipped")
            continue
        cells[name] = _stage(steps[name])
        failed = cells[name].status != "ok" and name != "with_past"  # run falls back to the export without
    return cells
