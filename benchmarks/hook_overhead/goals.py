"""The performance goals, read from goals.json and checked against one run's rows."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

GOALS_FILE = Path(__file__).with_name("goals.json")
TABLES = ("steps", "enter_exit")


def load_goals(path: Path = GOALS_FILE) -> List[dict]:
    """The goal list; raises ValueError naming the goal when one is malformed."""
    goals = json.loads(path.read_text())["goals"]
    for goal in goals:
        check_goal_shape(goal)
    return goals


def check_goal_shape(goal: dict) -> None:
    name = goal.get("goal", repr(goal))
    if goal.get("table") not in TABLES:
        raise ValueError(f"goal {name!r}: table must be one of {TABLES}")
    if goal["table"] == "steps" and "variant" not in goal:
        raise ValueError(f"goal {name!r}: a 'steps' goal names a variant")
    if ("at_most" in goal) == ("iqr_contains" in goal):
        raise ValueError(f"goal {name!r}: give exactly one of 'at_most' and 'iqr_contains'")
    if "iqr_contains" in goal and not goal["figure"].endswith("_paired_ratio"):
        raise ValueError(f"goal {name!r}: 'iqr_contains' needs a <clock>_paired_ratio figure")


def find_row(goal: dict, rows: List[dict], enter_exit: List[dict], variant: Optional[str] = None):
    table = rows if goal["table"] == "steps" else enter_exit
    variant = variant or goal.get("variant")
    for row in table:
        if row["workload"] == goal["workload"] and (variant is None or row.get("variant") == variant):
            return row
    return None


def figure(goal: dict, rows: List[dict], enter_exit: List[dict]) -> Tuple[Optional[float], str]:
    """(the goal's figure in this run, or None, with why not)."""
    row = find_row(goal, rows, enter_exit)
    value = row.get(goal["figure"]) if row else None
    if value is None:
        return None, "not measured"
    if "over_variant" in goal:
        other = find_row(goal, rows, enter_exit, variant=goal["over_variant"])
        divisor = other.get(goal["figure"]) if other else None
        if divisor is None:
            return None, f"{goal['over_variant']} not measured"
        if divisor <= 0:
            return None, f"{goal['over_variant']}'s {goal['figure']} is {divisor:.3g} (not above the baseline)"
        value = value / divisor
    return value, ""


def check(goal: dict, rows: List[dict], enter_exit: List[dict]) -> Dict[str, object]:
    """One goal's outcome: its figure, the target, and met ("yes", "NO" or why it was not judged)."""
    value, why_not = figure(goal, rows, enter_exit)
    outcome = {"goal": goal["goal"], "figure": goal["figure"], "value": value}
    if "at_most" in goal:
        outcome["target"] = f"<= {goal['at_most']}"
        met = value is not None and value <= goal["at_most"]
    else:
        row = find_row(goal, rows, enter_exit)
        clock = goal["figure"].split("_", 1)[0]
        q1, q3 = (row.get(f"{clock}_paired_q1"), row.get(f"{clock}_paired_q3")) if row else (None, None)
        outcome["target"] = f"IQR contains {goal['iqr_contains']}"
        outcome["iqr"] = [q1, q3]
        met = value is not None and q1 is not None and q1 <= goal["iqr_contains"] <= q3
    outcome["met"] = why_not or ("yes" if met else "NO")
    return outcome


def check_all(rows: List[dict], enter_exit: List[dict], goals: Optional[List[dict]] = None) -> List[dict]:
    """Every goal whose workload ran; goals of workloads not in this run are left out."""
    ran = {r["workload"] for r in rows}
    return [check(g, rows, enter_exit) for g in (goals if goals is not None else load_goals())
            if g["workload"] in ran]
