"""Pipeline schedules as data: each stage's list of actions for one step.

An action is "F<i>" (the forward of micro-batch i), "B<i>" (its backward,
adding into the gradient accumulators) or "U" (the optimizer's update, once
per step). Each action runs one IR function of its stage (`stage_function`);
the point-to-point sends and receives are ops inside those functions.

    gpipe(2, 3)      -> [[F0 F1 F2 B0 B1 B2 U], [F0 F1 F2 B0 B1 B2 U]]
    one_f_one_b(2, 3) -> [[F0 F1 B0 F2 B1 B2 U], [F0 B0 F1 B1 F2 B2 U]]

1F1B (PipeDream-Flush, Megatron's default): stage s runs S-1-s warm-up
forwards, then one forward and one backward in turn, then the cool-down's
backwards; at most S-s micro-batches' activations are alive on stage s.
`simulate` runs the action lists with the functions' messages (sends never
block, a receive waits for its send), for the predicted timeline and to
prove that a schedule cannot deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.dialects.builtin import ArrayAttr, DictionaryAttr, IntegerAttr, ModuleOp, StringAttr, i64

from ...ir.attrs import PIPELINE_ATTR
from ...ir.errors import PlaitError

FORWARD, BACKWARD, UPDATE = "F", "B", "U"
KINDS = {FORWARD: "forward", BACKWARD: "backward", UPDATE: "update"}


def stage_function(kind: str, stage: int) -> str:
    """The IR function stage `stage` runs for an action of `kind` (F, B or U)."""
    return f"{KINDS[kind]}_stage{stage}"


def gpipe(stages: int, micro: int) -> list[list[str]]:
    """All forwards, then all backwards (GPipe, Huang et al. 2019)."""
    one = [f"F{i}" for i in range(micro)] + [f"B{i}" for i in range(micro)] + [UPDATE]
    return [list(one) for _ in range(stages)]


def one_f_one_b(stages: int, micro: int) -> list[list[str]]:
    """Warm-up forwards, then one forward one backward, then the cool-down."""
    out = []
    for s in range(stages):
        warm = min(stages - 1 - s, micro)
        actions = [f"F{i}" for i in range(warm)]
        for i in range(micro - warm):
            actions += [f"F{warm + i}", f"B{i}"]
        actions += [f"B{i}" for i in range(micro - warm, micro)]
        out.append([*actions, UPDATE])
    return out


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b}


def parse_action(action: str) -> tuple[str, int | None]:
    """'F3' -> ('F', 3); 'U' -> ('U', None)."""
    return action[0], int(action[1:]) if len(action) > 1 else None


@dataclass(frozen=True)
class PipelinePlan:
    """What the pipeline pass recorded on the module (`plait.pipeline`)."""

    stages: int
    microbatches: int
    schedule: str
    actions: list[list[str]]


def record(module: ModuleOp, plan: PipelinePlan, notes: dict[str, str]) -> None:
    """Write `plan` (and the pass's `notes`: the cut, predicted times) on the module."""
    module.attributes[PIPELINE_ATTR] = DictionaryAttr(
        {
            "stages": IntegerAttr(plan.stages, i64),
            "microbatches": IntegerAttr(plan.microbatches, i64),
            "schedule": StringAttr(plan.schedule),
            "actions": ArrayAttr([ArrayAttr([StringAttr(a) for a in row]) for row in plan.actions]),
            **{k: StringAttr(v) for k, v in notes.items()},
        }
    )


def pipeline_plan(module: ModuleOp) -> PipelinePlan | None:
    """The module's pipeline plan, or None when it is not pipelined."""
    attr = module.attributes.get(PIPELINE_ATTR)
    if attr is None:
        return None
    fields = attr.data
    try:
        return PipelinePlan(
            fields["stages"].value.data,
            fields["microbatches"].value.data,
            fields["schedule"].data,
            [[a.data for a in row.data] for row in fields["actions"].data],
        )
    except (KeyError, AttributeError) as exc:
        raise PlaitError(
            f"the module's {PIPELINE_ATTR} attribute is malformed ({exc}); run the pipeline "
            "pass again"
        ) from None


# a function's messages in order: ("send" | "recv", peer stage)
Messages = dict[tuple[str, int], list[tuple[str, int]]]


@dataclass
class Timeline:
    """A simulated step: per stage, (action, start, end); the step's time and
    its bubble (the share of stage time spent waiting)."""

    spans: list[list[tuple[str, float, float]]]
    time: float
    bubble: float


class DeadlockError(PlaitError):
    """Action lists whose receives wait for sends that never come."""


def simulate(
    actions: list[list[str]], times: dict[tuple[str, int], float], messages: Messages
) -> Timeline:
    """Run the stages' action lists: an action starts when its stage is free
    and each message it receives was sent (by its sender's action's end);
    sends never block. `times[(kind, stage)]` is an action's seconds.
    Raises DeadlockError when no stage can go on."""
    stages = len(actions)
    sent: dict[tuple[int, int], list[float]] = {}  # (from, to) -> send times, in order
    taken: dict[tuple[int, int], int] = {}  # (from, to) -> messages received
    next_action = [0] * stages
    clock = [0.0] * stages
    spans: list[list[tuple[str, float, float]]] = [[] for _ in range(stages)]
    progress = True
    while progress:
        progress = False
        for s in range(stages):
            while next_action[s] < len(actions[s]):
                action = actions[s][next_action[s]]
                kind, _ = parse_action(action)
                talk = messages.get((kind, s), [])
                counts: dict[int, int] = {}
                ready = clock[s]
                for what, peer in talk:
                    if what != "recv":
                        continue
                    k = taken.get((peer, s), 0) + counts.get(peer, 0)
                    arrived = sent.get((peer, s), [])
                    if k >= len(arrived):
                        break
                    counts[peer] = counts.get(peer, 0) + 1
                    ready = max(ready, arrived[k])
                else:
                    end = ready + times.get((kind, s), 0.0)
                    for peer, n in counts.items():
                        taken[peer, s] = taken.get((peer, s), 0) + n
                    for what, peer in talk:
                        if what == "send":
                            sent.setdefault((s, peer), []).append(end)
                    spans[s].append((action, ready, end))
                    clock[s] = end
                    next_action[s] += 1
                    progress = True
                    continue
                break
    stuck = [s for s in range(stages) if next_action[s] < len(actions[s])]
    if stuck:
        s = stuck[0]
        raise DeadlockError(
            f"the schedule deadlocks: stage {s} waits in {actions[s][next_action[s]]} for a "
            "message no stage sends"
        )
    time = max(clock) if clock else 0.0
    busy = sum(end - start for row in spans for _, start, end in row)
    bubble = 1 - busy / (stages * time) if time > 0 else 0.0
    return Timeline(spans, time, bubble)
