"""Pipeline schedules as data: each stage's list of actions for one step.

An action is "F<i>" (the forward of micro-batch i), "B<i>" (its backward,
adding into the gradient accumulators) or "U" (the optimizer's update, once
per step); with V virtual stages per rank (interleaved), "F<i>.<v>" is the
forward of micro-batch i on the rank's chunk v, virtual stage v * S + rank.
Each action runs one IR function of its (virtual) stage (`stage_function`);
the point-to-point sends and receives are ops inside those functions.

    gpipe(2, 3)      -> [[F0 F1 F2 B0 B1 B2 U], [F0 F1 F2 B0 B1 B2 U]]
    one_f_one_b(2, 3) -> [[F0 F1 B0 F2 B1 B2 U], [F0 B0 F1 B1 F2 B2 U]]

1F1B (PipeDream-Flush, Megatron's default): stage s runs S-1-s warm-up
forwards, then one forward and one backward in turn, then the cool-down's
backwards; at most S-s micro-batches' activations are alive on stage s.
Interleaved 1F1B (Narayanan et al. 2021, Megatron's order) gives each rank V
chunks, shrinking the bubble V-fold. `simulate` runs the action lists with
the functions' messages (sends never block, a receive waits for its send,
matched by tag and micro-batch, and for the message's time on the pp axis's
link: latency + bytes / bandwidth), for the predicted timeline and to prove
that a schedule cannot deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass

from xdsl.dialects.builtin import ArrayAttr, DictionaryAttr, IntegerAttr, ModuleOp, StringAttr, i64

from ...cost.comm_cost import message_time
from ...hardware import Link
from ...ir.attrs import PIPELINE_ATTR
from ...ir.errors import PlaitError

FORWARD, BACKWARD, UPDATE = "F", "B", "U"
KINDS = {FORWARD: "forward", BACKWARD: "backward", UPDATE: "update"}


def stage_function(kind: str, stage: int) -> str:
    """The IR function stage `stage` runs for an action of `kind` (F, B or U)."""
    return f"{KINDS[kind]}_stage{stage}"


def gpipe(stages: int, micro: int, virtual: int = 1) -> list[list[str]]:
    """All forwards, then all backwards (GPipe, Huang et al. 2019)."""
    one = [f"F{i}" for i in range(micro)] + [f"B{i}" for i in range(micro)] + [UPDATE]
    return [list(one) for _ in range(stages)]


def one_f_one_b(stages: int, micro: int, virtual: int = 1) -> list[list[str]]:
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


def interleaved(stages: int, micro: int, virtual: int) -> list[list[str]]:
    """Megatron's interleaved 1F1B: the k-th forward of a rank is micro-batch
    (k // (S V)) S + k % S on chunk (k // S) % V, its k-th backward the same
    micro-batch on chunk V - 1 - (k // S) % V; rank r warms up with
    2 (S - r - 1) + (V - 1) S forwards. Needs micro-batches a multiple of S."""
    total = micro * virtual

    def micro_of(k: int) -> int:
        return (k // (stages * virtual)) * stages + k % stages

    out = []
    for r in range(stages):
        warm = min(2 * (stages - r - 1) + (virtual - 1) * stages, total)
        forwards = [f"F{micro_of(k)}.{(k // stages) % virtual}" for k in range(total)]
        backwards = [
            f"B{micro_of(k)}.{virtual - 1 - (k // stages) % virtual}" for k in range(total)
        ]
        actions = forwards[:warm]
        for k in range(total - warm):
            actions += [forwards[warm + k], backwards[k]]
        out.append([*actions, *backwards[total - warm :], UPDATE])
    return out


SCHEDULES = {"gpipe": gpipe, "1f1b": one_f_one_b, "interleaved": interleaved}


def parse_action(action: str) -> tuple[str, int | None, int]:
    """'F3' -> ('F', 3, 0); 'B3.1' -> ('B', 3, 1) (chunk 1); 'U' -> ('U', None, 0)."""
    if len(action) == 1:
        return action, None, 0
    index, _, chunk = action[1:].partition(".")
    return action[0], int(index), int(chunk or 0)


@dataclass(frozen=True)
class PipelinePlan:
    """What the pipeline pass recorded on the module (`plait.pipeline`)."""

    stages: int  # ranks along pp
    microbatches: int
    schedule: str
    actions: list[list[str]]  # per rank
    virtual: int = 1  # stages (chunks) per rank: stage v * stages + rank is the rank's chunk v

    def stage_of(self, rank: int, chunk: int) -> int:
        return chunk * self.stages + rank

    def stages_of(self, rank: int) -> list[int]:
        """The (virtual) stages a rank runs."""
        return [self.stage_of(rank, v) for v in range(self.virtual)]


def record(module: ModuleOp, plan: PipelinePlan, notes: dict[str, str]) -> None:
    """Write `plan` (and the pass's `notes`: the cut, predicted times) on the module."""
    module.attributes[PIPELINE_ATTR] = DictionaryAttr(
        {
            "stages": IntegerAttr(plan.stages, i64),
            "microbatches": IntegerAttr(plan.microbatches, i64),
            "virtual": IntegerAttr(plan.virtual, i64),
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
            fields["virtual"].value.data,
        )
    except (KeyError, AttributeError) as exc:
        raise PlaitError(
            f"the module's {PIPELINE_ATTR} attribute is malformed ({exc}); run the pipeline "
            "pass again"
        ) from None


# a (virtual) stage function's messages in order: ("send" | "recv", tag, bytes);
# a send and its recv share a tag, unique in the module, and a micro-batch
Messages = dict[tuple[str, int], list[tuple[str, int, int]]]


@dataclass
class Timeline:
    """A simulated step: per rank, (action, start, end); the step's time and
    its bubble (the share of rank time spent waiting)."""

    spans: list[list[tuple[str, float, float]]]
    time: float
    bubble: float


class DeadlockError(PlaitError):
    """Action lists whose receives wait for sends that never come."""


def simulate(
    actions: list[list[str]],
    times: dict[tuple[str, int], float],
    messages: Messages,
    link: Link | None = None,
) -> Timeline:
    """Run the ranks' action lists: an action starts when its rank is free
    and each message it receives has arrived (sent at its sender's action's
    end, then `message_time` on `link`; None: at once); sends never block.
    `times[(kind, stage)]` is an action's seconds (the update's by rank).
    Raises DeadlockError when no rank can go on."""
    ranks = len(actions)
    arrived: dict[tuple[int, int | None], float] = {}  # (tag, micro-batch) -> when
    next_action = [0] * ranks
    clock = [0.0] * ranks
    spans: list[list[tuple[str, float, float]]] = [[] for _ in range(ranks)]
    progress = True
    while progress:
        progress = False
        for r in range(ranks):
            while next_action[r] < len(actions[r]):
                action = actions[r][next_action[r]]
                kind, index, chunk = parse_action(action)
                stages = _action_stages(actions, r, kind, chunk)
                talk = [m for stage in stages for m in messages.get((kind, stage), [])]
                waits = [arrived.get((tag, index)) for what, tag, _ in talk if what == "recv"]
                if None in waits:
                    break
                end = max([clock[r], *waits]) + sum(times.get((kind, s), 0.0) for s in stages)
                for what, tag, size in talk:
                    if what == "send":
                        arrived[tag, index] = end + (message_time(size, link) if link else 0.0)
                spans[r].append((action, max([clock[r], *waits]), end))
                clock[r] = end
                next_action[r] += 1
                progress = True
    stuck = [r for r in range(ranks) if next_action[r] < len(actions[r])]
    if stuck:
        r = stuck[0]
        raise DeadlockError(
            f"the schedule deadlocks: rank {r} waits in {actions[r][next_action[r]]} for a "
            "message no rank sends"
        )
    time = max(clock) if clock else 0.0
    busy = sum(end - start for row in spans for _, start, end in row)
    bubble = 1 - busy / (ranks * time) if time > 0 else 0.0
    return Timeline(spans, time, bubble)


def _action_stages(actions: list[list[str]], rank: int, kind: str, chunk: int) -> list[int]:
    """The stage function an action of `rank` runs: its chunk's, or the rank's update."""
    return [rank] if kind == UPDATE else [chunk * len(actions) + rank]
