"""The audit's own privacy: small cells and identifier-like columns, decided in one place.

* **Small cells.** A group with fewer than :data:`MIN_CELL` *patients* (``AuditConfig.min_cell``) is shown
  nowhere: wherever groups appear (fairness groups, performance parity, the aif360 metrics, the cohort
  composition, the attacks by group) its entry is :func:`suppressed`, ``{"n": null, "suppressed": true}``,
  and warnings name it without a count. Health statistics use the same rule (a cell under 10 is not
  published).
* **Split counts.** In the cohort composition, a split count under ``min_cell`` patients is hidden too,
  with the group's next-smallest split counts, so that it cannot be worked out from the group's total
  (:func:`suppress_table`).
* **What is not done: complementary suppression across groups.** A suppressed group's size, and its additive
  figures (such as how many of its positives the threshold caught), can be worked out from the published
  totals when it is its attribute's only suppressed group and no value is unknown; hiding a large group to
  prevent that would hide the metrics the audit exists for. Its AUROC and parity cannot be: it is left out
  of the other groups' references and of the one-vs-rest comparisons.
* **Identifier-like columns** (:func:`identifier_like`: more than :data:`MAX_GROUPS` distinct values, or
  distinct values for more than half of the patients) are never grouped, even when named; the warning names
  the column, never a value.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

MIN_CELL = 10      # smallest group (in patients) whose counts and metrics are shown
MAX_GROUPS = 50    # a column with more distinct values than this is an identifier, not an attribute


def suppressed() -> dict:
    """The entry that stands for a suppressed group: no count, no metric."""
    return {"n": None, "suppressed": True}


def is_suppressed(entry) -> bool:
    return isinstance(entry, Mapping) and entry.get("suppressed") is True


def units_of(frame) -> np.ndarray:
    """The privacy unit of each row: its ``patient_id``, else the row itself (each row one patient)."""
    if "patient_id" in frame.columns:
        return frame["patient_id"].astype(str).to_numpy()
    return np.array([f"row {i}" for i in range(len(frame))], dtype=object)


def count_units(units: np.ndarray, mask: np.ndarray) -> int:
    """Distinct patients among the rows in ``mask``."""
    return int(len(np.unique(units[mask]))) if mask.any() else 0


def identifier_like(values: np.ndarray, units: np.ndarray) -> str | None:
    """Why a column of group values looks like an identifier (more than MAX_GROUPS distinct values, or a
    distinct value for more than half of the patients who have one), or None. ``values``: object array,
    None = unknown. The reason never quotes a value."""
    known = np.array([v is not None for v in values], dtype=bool)
    if not known.any():
        return None
    distinct = len(set(values[known].tolist()))
    if distinct > MAX_GROUPS:
        return f"more than {MAX_GROUPS} distinct values"
    patients = count_units(units, known)
    if distinct > patients / 2:
        return f"{distinct} distinct values for {patients} patients"
    return None


def suppress_groups(counts: Mapping, min_cell: int, start=()) -> set:
    """The groups to suppress, given each group's patient count: those with fewer than ``min_cell`` (and more
    than 0), and those in ``start`` (suppressed already, e.g. for the whole attribute)."""
    return {g for g, c in counts.items() if 0 < c < min_cell} | (set(start) & set(counts))


def suppress_table(counts: Mapping, min_cell: int, *, whole_rows: bool = False) -> tuple[set, set]:
    """Suppression in a table of patient counts, one row per group and one column per part (e.g. the splits),
    whose row totals are published. Returns (rows, cells): the groups suppressed whole, and the (group,
    column) cells hidden in the others.

    * a row whose total is under ``min_cell`` is suppressed whole;
    * in the other rows a cell under ``min_cell`` (and not 0) is hidden, and so that it cannot be worked out
      from the row's total, the hidden cells of a row must hold at least ``min_cell`` patients together: the
      row's smallest visible non-zero cells are hidden with it until they do (or, when none is left, the row
      is suppressed).

    With ``whole_rows`` no cell is hidden alone: a row with a small cell is suppressed whole (for metrics
    computed from every cell of a row, such as an attack's AUC by group).
    """
    c = {g: np.asarray(v, dtype=int) for g, v in counts.items()}
    rows, cells = set(), set()
    for g, row in c.items():
        small = [j for j in range(len(row)) if 0 < row[j] < min_cell]
        if 0 < row.sum() < min_cell or (small and whole_rows):
            rows.add(g)
            continue
        hide = set(small)
        while hide and sum(int(row[j]) for j in hide) < min_cell:
            visible = [j for j in range(len(row)) if j not in hide and row[j] > 0]
            if not visible:
                rows.add(g)
                break
            hide.add(min(visible, key=lambda j: (row[j], j)))
        if g not in rows:
            cells |= {(g, j) for j in hide}
    return rows, cells
