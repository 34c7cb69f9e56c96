"""Result tables, CSV files and plots, built only from the protocol runner's JSONL records (never from logs).

Conventions (also written into every report):

- Accuracies are percentages; a table cell is the mean over seeds ± the **sample** standard deviation (``ddof = 1``,
  ``n − 1`` denominator). The papers do not say which they use. With a single seed the std is undefined: shown as
  ``–`` in markdown, empty in CSV, ``nan`` in the Python objects.
- Base-to-novel: per dataset, HM = 2·B·N/(B + N) of the mean B and mean N over seeds. The "Average" row averages B and
  N over its datasets first and takes the HM of those two averages — not the mean of the per-dataset HMs. Only seeds
  with both a base and a novel record count (others are listed in the notes).
- Average rows (over datasets, or over transfer targets) carry a std only when every averaged cell has the same seeds:
  it is then the std over seeds of the per-seed averages.
- Cross-dataset and domain generalisation: the source dataset is reported separately; "Avg (targets)" averages the
  evaluated datasets other than the source.

Public API: :func:`read_records`, :func:`base2novel_table`, :func:`fewshot_table`, :func:`cross_dataset_table`,
:func:`dg_table`, :func:`training_curves`, :func:`write_report`, plus the small helpers :func:`harmonic_mean`,
:func:`mean_std`, :func:`dataset_sort_key` and :func:`method_sort_key`, all importable from ``promptclip.report``.

Modules, each importing only those above it:

- ``records``: reading and validating JSONL records; the normalised per-protocol view (:class:`RecordWarning`).
- ``stats``: mean ± sample std, harmonic mean, averages over cells that share seeds.
- ``order``: the row order of datasets and methods.
- ``tables``: the four protocol tables as dataclasses.
- ``curves``: the training metrics (``metrics.jsonl``) of the recorded runs, grouped for the curve plots.
- ``formatting``: number formats and labels shared by the outputs.
- ``markdown``, ``csv_files``, ``plots``: one output format each (plots need the ``plot`` extra).
- ``write``: :func:`write_report`, the report folder from all of the above.
"""

from .curves import CurveGroup, CurveSeries, training_curves
from .formatting import RANDOM_WEIGHTS_BANNER, STD_CONVENTION
from .order import dataset_sort_key, method_sort_key
from .records import PROTOCOLS, RecordWarning, read_records
from .stats import Stat, harmonic_mean, mean_std
from .tables import (
    B2NAverage,
    B2NRow,
    B2NTable,
    FewShotAverage,
    FewShotRow,
    FewShotTable,
    TransferAverage,
    TransferCell,
    TransferTable,
    base2novel_table,
    cross_dataset_table,
    dg_table,
    fewshot_table,
)
from .write import write_report

__all__ = [
    "PROTOCOLS",
    "STD_CONVENTION",
    "RANDOM_WEIGHTS_BANNER",
    "RecordWarning",
    "Stat",
    "B2NRow",
    "B2NAverage",
    "B2NTable",
    "FewShotRow",
    "FewShotAverage",
    "FewShotTable",
    "TransferCell",
    "TransferAverage",
    "TransferTable",
    "CurveGroup",
    "CurveSeries",
    "read_records",
    "harmonic_mean",
    "mean_std",
    "dataset_sort_key",
    "method_sort_key",
    "base2novel_table",
    "fewshot_table",
    "cross_dataset_table",
    "dg_table",
    "training_curves",
    "write_report",
]

