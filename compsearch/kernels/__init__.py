"""The core kernels, shared by a search trial's short fine-tune and the final run.

Public surface (each module's own names stay importable from it):

* quantization — :func:`quantize_`, :func:`calibrate`, the weight formats (:class:`WeightFormat`,
  :func:`register_format`, :func:`get_format`);
* pruning — :func:`analyze`, :func:`prune_`, :func:`replay_`, :class:`PruneRecord`;
* deploy forms and artifacts — :func:`to_deploy`, :func:`export_packed`, :func:`save_packed`,
  :func:`read_packed`;
* distillation losses — :func:`kd_loss`, :func:`output_loss`, :func:`feature_loss`,
  :func:`attention_loss`.
"""

from compsearch.kernels.deploy import to_deploy
from compsearch.kernels.distill import attention_loss, feature_loss, kd_loss, output_loss
from compsearch.kernels.formats import WeightFormat, get_format, register_format
from compsearch.kernels.observers import calibrate
from compsearch.kernels.packing import export_packed, read_packed, save_packed
from compsearch.kernels.prune import PruneRecord, analyze, prune_, replay_
from compsearch.kernels.quant import quantize_

__all__ = [
    "PruneRecord",
    "WeightFormat",
    "analyze",
    "attention_loss",
    "calibrate",
    "export_packed",
    "feature_loss",
    "get_format",
    "kd_loss",
    "output_loss",
    "prune_",
    "quantize_",
    "read_packed",
    "register_format",
    "replay_",
    "save_packed",
    "to_deploy",
]
