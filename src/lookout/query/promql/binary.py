"""Binary operators: arithmetic, comparison (with `bool`) and set operators, between
scalars and vectors, with on/ignoring and group_left/group_right, as Prometheus 3 does.

Vector matching works per step: a series of the "one" side may be matched at some steps
and not at others, and uniqueness is checked at each step, not over the whole range.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from lookout.errors import PromQLError
from lookout.query.promql.model import Floats
from lookout.query.promql.values import (
    RESERVED,
    Labels,
    Scalar,
    Value,
    Vector,
    name_dropped,
)

if TYPE_CHECKING:
    from lookout.query.promql.engine import Evaluation

ARITHMETIC = {"+", "-", "*", "/", "%", "^", "atan2"}
COMPARISON = {"==", "!=", ">", "<", ">=", "<="}
SET = {"and", "or", "unless"}


def apply(op: str, lhs: Floats, rhs: Floats) -> tuple[Floats, Any]:
    """The value and, for comparisons, the keep mask of `lhs op rhs` element-wise."""
    with np.errstate(all="ignore"):
        if op == "+":
            return lhs + rhs, None
        if op == "-":
            return lhs - rhs, None
        if op == "*":
            return lhs * rhs, None
        if op == "/":
            return lhs / rhs, None
        if op == "%":
            return np.fmod(lhs, rhs), None
        if op == "^":
            return np.power(lhs, rhs), None
        if op == "atan2":
            return np.arctan2(lhs, rhs), None
        if op == "==":
            return lhs, lhs == rhs
        if op == "!=":
            return lhs, lhs != rhs
        if op == ">":
            return lhs, lhs > rhs
        if op == "<":
            return lhs, lhs < rhs
        if op == ">=":
            return lhs, lhs >= rhs
        if op == "<=":
            return lhs, lhs <= rhs
    raise PromQLError(f"operator {op!r} not allowed here", "bad_data")


def evaluate(ev: Evaluation, node: Any) -> Value:
    op = str(node.op)
    modifier = node.modifier
    if has_fill(modifier):
        raise PromQLError("fill modifiers (fill, fill_left, fill_right) are experimental in "
                          "Prometheus and not supported by Lookout", "bad_data")  # fmt: skip
    return_bool = bool(modifier is not None and modifier.return_bool)
    lhs = ev.eval(node.lhs)
    rhs = ev.eval(node.rhs)
    if isinstance(lhs, Scalar) and isinstance(rhs, Scalar):
        values, keep = apply(op, lhs.values, rhs.values)
        if keep is not None:
            values = keep.astype(np.float64)
        return Scalar(values)
    delayed = ev.engine.delayed_name_removal
    if isinstance(lhs, Vector) and isinstance(rhs, Scalar):
        return _vector_scalar(op, lhs, rhs.values, swap=False, return_bool=return_bool,
                              delayed=delayed)  # fmt: skip
    if isinstance(lhs, Scalar) and isinstance(rhs, Vector):
        return _vector_scalar(op, rhs, lhs.values, swap=True, return_bool=return_bool,
                              delayed=delayed)  # fmt: skip
    if isinstance(lhs, Vector) and isinstance(rhs, Vector):
        if op in SET:
            return _set_op(op, lhs, rhs, modifier)
        return _vector_vector(op, lhs, rhs, modifier, return_bool=return_bool, delayed=delayed)
    raise PromQLError(f"binary operator {op!r} between {type(lhs).__name__} and "
                      f"{type(rhs).__name__} is not allowed", "bad_data")  # fmt: skip


def has_fill(modifier: Any) -> bool:
    """Whether a binary operator's modifier carries fill values (`+ fill(0)`)."""
    fill = getattr(modifier, "fill_values", None) if modifier is not None else None
    return fill is not None and (fill.lhs is not None or fill.rhs is not None)


def _drops_name(op: str, return_bool: bool) -> bool:
    return op in ARITHMETIC or return_bool


def _vector_scalar(
    op: str, vector: Vector, scalar: Floats, *, swap: bool, return_bool: bool, delayed: bool
) -> Vector:
    row = scalar[None, :]
    if swap:
        values, keep = apply(op, np.broadcast_to(row, vector.values.shape), vector.values)
    else:
        values, keep = apply(op, vector.values, row)
    present = vector.present
    if keep is not None:
        values = vector.values  # a comparison keeps the vector's own value
        if return_bool:
            values = keep.astype(np.float64)
        else:
            present = present & keep
    if _drops_name(op, return_bool):
        return name_dropped(vector.labels, values, present, unique=vector.unique,
                            prior=vector.drop, delayed=delayed)  # fmt: skip
    return Vector(vector.labels, values, present, None, unique=vector.unique, drop=vector.drop)


def _signature_fn(modifier: Any) -> tuple[bool, list[str]]:
    """(on, labels): `on` keeps only the labels, `ignoring` (the default) drops them and
    the metric name."""
    if modifier is None or modifier.matching is None:
        return False, []
    on = str(modifier.matching.type).endswith("Include")
    return on, list(modifier.matching.labels)


def _signatures(labels: list[Labels], on: bool, names: list[str]) -> list[tuple[str, ...]]:
    if on:
        return [tuple(lb.get(n, "") for n in names) for lb in labels]
    dropped = set(names) | RESERVED
    return [tuple(sorted((k, v) for k, v in lb.items() if k not in dropped)) for lb in labels]  # type: ignore[misc]


def _set_op(op: str, lhs: Vector, rhs: Vector, modifier: Any) -> Vector:
    on, names = _signature_fn(modifier)
    lsig = _signatures(lhs.labels, on, names)
    rsig = _signatures(rhs.labels, on, names)
    steps = lhs.values.shape[1]

    def presence(sigs: list[tuple[str, ...]], vec: Vector) -> dict[tuple[str, ...], Any]:
        found: dict[tuple[str, ...], Any] = {}
        for i, sig in enumerate(sigs):
            if sig in found:
                found[sig] = found[sig] | vec.present[i]
            else:
                found[sig] = vec.present[i]
        return found

    none = np.zeros(steps, dtype=bool)
    if op in ("and", "unless"):
        right = presence(rsig, rhs)
        present = lhs.present.copy()
        for i, sig in enumerate(lsig):
            found = right.get(sig, none)
            present[i] &= found if op == "and" else ~found
        return Vector(lhs.labels, lhs.values, present, None, unique=lhs.unique, drop=lhs.drop)
    # or: everything of lhs, and rhs rows whose signature lhs lacks at that step
    left = presence(lsig, lhs)
    rpresent = rhs.present.copy()
    for i, sig in enumerate(rsig):
        rpresent[i] &= ~left.get(sig, none)
    return Vector(
        lhs.labels + rhs.labels,
        np.concatenate([lhs.values, rhs.values]),
        np.concatenate([lhs.present, rpresent]),
        None,
        unique=False,
        drop=_flags(lhs, rhs),
    ).merged()


def _flags(lhs: Vector, rhs: Vector) -> Any:
    """Both sides' delayed-removal flags, one after the other (None when neither has any)."""
    if lhs.drop is None and rhs.drop is None:
        return None
    left = lhs.drop if lhs.drop is not None else np.zeros(len(lhs), dtype=bool)
    right = rhs.drop if rhs.drop is not None else np.zeros(len(rhs), dtype=bool)
    return np.concatenate([left, right])


def _vector_vector(
    op: str, lhs: Vector, rhs: Vector, modifier: Any, *, return_bool: bool, delayed: bool
) -> Vector:
    card = str(modifier.card) if modifier is not None else "OneToOne"
    one_to_many = card.endswith("OneToMany")
    many_to_one = card.endswith("ManyToOne")
    include = list(modifier.group_labels or []) if (one_to_many or many_to_one) else []
    on, names = _signature_fn(modifier)
    many, one = (rhs, lhs) if one_to_many else (lhs, rhs)
    msig = _signatures(many.labels, on, names)
    osig = _signatures(one.labels, on, names)
    steps = lhs.values.shape[1]

    by_sig: dict[tuple[str, ...], list[int]] = {}
    for i, sig in enumerate(osig):
        by_sig.setdefault(sig, []).append(i)
    _check_one_side(one, by_sig, "left" if one_to_many else "right", on, names)

    out_labels: list[Labels] = []
    out_values: list[Floats] = []
    out_present: list[Any] = []
    out_sig: list[tuple[str, ...]] = []
    out_matched: list[Any] = []
    out_drop: list[bool] = []
    drops = _drops_name(op, return_bool)
    for i, sig in enumerate(msig):
        for j in by_sig.get(sig, ()):
            both = many.present[i] & one.present[j]
            if not both.any():
                continue
            left, right = (one.values[j], many.values[i]) if one_to_many else (
                many.values[i], one.values[j])  # fmt: skip
            values, keep = apply(op, left, right)
            matched = both
            if keep is not None:
                if return_bool:
                    values = keep.astype(np.float64)
                else:
                    both = both & keep
            labels = _result_labels(many.labels[i], one.labels[j], op, card, on=on, names=names,
                                    include=include, drop_name=drops and not delayed)  # fmt: skip
            out_labels.append(labels)
            out_drop.append(delayed and (drops or bool(many.drop is not None and many.drop[i])))
            out_values.append(values)
            out_present.append(both)
            out_matched.append(matched)
            out_sig.append(sig)
    if not out_labels:
        return Vector.empty(steps)
    present = np.array(out_present).reshape(len(out_labels), steps)
    values_all = np.array(out_values).reshape(len(out_labels), steps)
    # Per step, a match group yields one result (one-to-one) or one per result label set.
    groups: dict[Any, list[int]] = {}
    for k, sig in enumerate(out_sig):
        key = sig if card.endswith("OneToOne") else (sig, tuple(sorted(out_labels[k].items())))
        groups.setdefault(key, []).append(k)
    # Uniqueness is checked before comparisons filter: Prometheus 3 reports a many-to-many
    # match even when the filter would have left one side.
    matched = np.array(out_matched).reshape(len(out_labels), steps)
    for rows in groups.values():
        if len(rows) > 1 and (matched[rows].sum(axis=0) > 1).any():
            if card.endswith("OneToOne"):
                raise PromQLError(
                    "multiple matches for labels: many-to-one matching must be explicit "
                    "(group_left/group_right)",
                    "execution",
                )
            raise PromQLError(
                "multiple matches for matching labels: grouping labels must ensure unique matches",
                "execution",
            )
    drop = np.array(out_drop, dtype=bool) if delayed else None
    return Vector(out_labels, values_all, present, None, unique=False, drop=drop).merged()


def _check_one_side(
    one: Vector, by_sig: dict[tuple[str, ...], list[int]], side: str, on: bool, names: list[str]
) -> None:
    """The "one" side of a match may hold a match group only once per step."""
    for rows in by_sig.values():
        if len(rows) > 1 and (one.present[rows].sum(axis=0) > 1).any():
            a, b = rows[0], rows[1]
            group = _match_text(one.labels[a], on, names)
            raise PromQLError(
                f"found duplicate series for the match group {group} on the {side} hand-side "
                f"of the operation: [{_labels_text(one.labels[a])}, {_labels_text(one.labels[b])}]"
                ";many-to-many matching not allowed: matching labels must be unique on one side",
                "execution",
            )


def _result_labels(
    many: Labels,
    one: Labels,
    op: str,
    card: str,
    *,
    on: bool,
    names: list[str],
    include: list[str],
    drop_name: bool,
) -> Labels:
    out = dict(many)
    if drop_name:
        for name in RESERVED:
            out.pop(name, None)
    if card.endswith("OneToOne"):
        if on:
            out = {k: v for k, v in out.items() if k in names}
        else:
            for n in names:
                out.pop(n, None)
    for name in include:
        value = one.get(name, "")
        if value:
            out[name] = value
        else:
            out.pop(name, None)
    return out


def _labels_text(labels: Labels) -> str:
    """Labels as Prometheus 3 prints them in errors: `{__name__="x", a="b"}`."""
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def _match_text(labels: Labels, on: bool, names: list[str]) -> str:
    if on:
        kept = {k: v for k, v in labels.items() if k in names}
    else:
        kept = {k: v for k, v in labels.items() if k not in names and k not in RESERVED}
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(kept.items())) + "}"
