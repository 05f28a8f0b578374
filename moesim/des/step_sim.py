"""One forward step on every rank, as a discrete-event simulation.

Each GPU ("rank") has a compute stream and a communication stream (one per micro-batch); the
ports of its NVLink / PCIe / NIC links are bandwidth-shared resources (processor sharing between
the transfers that cross them at the same time); a collective is a barrier over its group
followed by a latency and a transfer on every member's port, so the slowest member sets the pace
and the others' time at the barrier is recorded as waiting.

Layering: no op cost is derived here. The load-independent ops (attention blocks, dense MLPs,
head, pipeline sends, engine overhead) are those of :func:`moesim.step.build_step` for the batch;
each MoE layer's ops (router, dispatch, experts, shared experts, combine / all-reduce) come from
:func:`moesim.step.moe_layer_ops` — the function ``build_step`` itself calls per layer — for
that layer's routing sample, with the launch cost of ``moesim.step.with_launch``; its per-EP-rank
expert times give every rank its own expert work. The eager launch stalls of the assembled step
shrink as ``moesim.step.overlap_host`` shrinks them (the host runs ahead of the GPU). Without overlap the simulated step equals
``build_step(sc, batch, loads).time_us`` for any loads (tests/test_des.py).

Two evaluators share one :class:`StepPlan`:

- :func:`closed_form` — no overlap: collectives synchronise the group, so the step is the sum of
  the ops with each MoE layer's expert time the maximum over ranks; per-rank busy and waiting
  times follow. Microseconds per call; the serving simulator uses it for every step when
  nothing overlaps.
- :func:`simulate_step` — simpy: streams, barriers, link sharing and the overlap options
  (shared expert || dispatch, two micro-batches, next-layer attention || combine); records an
  op-level timeline for Chrome traces.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import numpy as np
import simpy

from ..costs import comm as comm_costs
from ..costs.op import OpCost
from ..routing import balanced_loads
from ..spec.scenario import Scenario
from ..step import Batch, build_step
from ..spec.simulation import OverlapSpec

COMPUTE, COMM = "compute", "comm"
#: Ops of a MoE layer that are not the routed experts (everything else with category "moe" is).
_ROUTER_OPS = ("router_gemm", "topk")
#: Collectives over the tensor-parallel group; any other collective spans the whole stage.
_TP_COLLECTIVES = ("attn_all_reduce", "mlp_all_reduce", "moe_all_reduce", "logits_gather")


# ---------------------------------------------------------------------------------------------
# topology
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Topology:
    """The GPUs of one instance: ``pp`` stages of ``tp * attention_dp`` ranks; inside a stage,
    local rank ``i`` is in attention-DP group ``i // tp`` and holds the experts of EP rank
    ``i // moe_tp``."""

    tp: int
    dp: int
    pp: int
    ep: int
    moe_tp: int
    gpus_per_node: int

    @staticmethod
    def of(sc: Scenario) -> "Topology":
        d = sc.deployment
        return Topology(d.tp, d.attention_dp, d.pp, d.ep, d.moe_tp, sc.gpus_per_node)

    @property
    def stage_size(self) -> int:
        return self.tp * self.dp

    @property
    def n_ranks(self) -> int:
        return self.stage_size * self.pp

    def stage(self, r: int) -> int:
        return r // self.stage_size

    def ep_rank(self, r: int) -> int:
        return (r % self.stage_size) // self.moe_tp

    def group(self, kind: str, r: int) -> tuple[int, ...]:
        """Members of rank ``r``'s group of ``kind`` ('tp' or 'stage')."""
        s0 = self.stage(r) * self.stage_size
        if kind == "tp":
            g0 = s0 + ((r - s0) // self.tp) * self.tp
            return tuple(range(g0, g0 + self.tp))
        return tuple(range(s0, s0 + self.stage_size))

    def group_size(self, kind: str) -> int:
        return {"tp": self.tp, "stage": self.stage_size, "pp": 2}[kind]

    def label(self, r: int) -> str:
        parts = [f"rank {r}"]
        if self.pp > 1:
            parts.append(f"stage {self.stage(r)}")
        if self.dp > 1:
            parts.append(f"dp {(r % self.stage_size) // self.tp}")
        if self.ep > 1:
            parts.append(f"ep {self.ep_rank(r)}")
        return " · ".join(parts)


# ---------------------------------------------------------------------------------------------
# the plan of one step
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpSpec:
    """One op of a layer template as the DES runs it. Compute ops last ``dur_us``; collectives
    are ``latency_us`` (alpha + launch) then ``transfer_us`` of bandwidth on ``port``."""

    name: str
    category: str
    stream: str
    dur_us: float
    group: str = ""          # collectives: 'tp', 'stage' or 'pp'
    latency_us: float = 0.0
    transfer_us: float = 0.0
    port: str = ""           # 'nvlink', 'pcie' or 'nic'
    expert: bool = False     # the routed experts of a MoE layer: duration per EP rank
    op: Optional[OpCost] = None


@dataclass
class StepPlan:
    """Everything needed to run one step (one micro-batch) on every rank. A layer of kind ``k``
    runs ``templates[k]`` (its attention block; a dense layer's MLP too) and, for MoE layer
    ``j``, then ``moe_ops[j]`` (router, dispatch, experts, shared experts, combine / all-reduce
    of that layer's routing sample; the experts one placeholder whose duration per EP rank is
    ``expert_us[j]``)."""

    batch: Batch
    topo: Topology
    templates: dict[str, list[OpSpec]]        # per layer kind, in issue order
    moe_ops: list[list[OpSpec]]               # per MoE layer, in issue order
    layers: list[tuple[str, int, int]]        # (kind, stage, MoE layer index or -1) in order
    head_pre: list[OpSpec]                    # stage 0, before the first layer
    head_post: list[OpSpec]                   # last stage, after the last layer
    pp_send: Optional[OpSpec]
    engine_us: float                          # host time per step (framework step overhead)
    expert_us: np.ndarray                     # [MoE layers, ep] expert time incl. launch
    expert_names: tuple[str, ...] = ()
    dropped_slots: float = 0.0
    rerouted_slots: float = 0.0
    routed_slots: float = 0.0
    _sums: Optional[dict[str, Any]] = field(default=None, repr=False)


@dataclass
class StepCost:
    """What one step cost: its time and, per rank, compute-busy, comm-busy and barrier-waiting
    microseconds (the rest of the step the rank idles: host overhead, other pipeline stages,
    launch gaps). Token-slot counts are those of the capacity policy (0 without one)."""

    time_us: float
    compute_us: np.ndarray
    comm_us: np.ndarray
    wait_us: np.ndarray
    dropped_slots: float = 0.0
    rerouted_slots: float = 0.0
    routed_slots: float = 0.0


def _comm_spec(sc: Scenario, topo: Topology, o: OpCost) -> OpSpec:
    group = "tp" if o.name in _TP_COLLECTIVES else "pp" if o.name == "pp_send" else "stage"
    n = topo.group_size(group)
    transfer, port = 0.0, "nvlink"
    fit = getattr(sc.hardware.collectives, o.family, None) if o.family else None
    if fit is not None:
        transfer = o.ideal_memory_us / fit.bus_efficiency.value
        on_nvlink = comm_costs._link(n, sc.gpus_per_node, sc.hardware, fit)[2]
        port = "nvlink" if on_nvlink else "pcie" if n <= sc.gpus_per_node else "nic"
    transfer = min(transfer, o.total_us)
    return OpSpec(o.name, o.category, COMM, o.total_us, group, o.total_us - transfer, transfer,
                  port, op=o)


def _spec(sc: Scenario, topo: Topology, o: OpCost) -> OpSpec:
    if o.category == "comm":
        return _comm_spec(sc, topo, o)
    return OpSpec(o.name, o.category, COMPUTE, o.total_us, op=o)


def _is_expert(o: OpCost) -> bool:
    return o.category == "moe" and o.name not in _ROUTER_OPS


def _field(res: Any, name: str, index: int, default: Any = None) -> Any:
    """A field of ``step.moe_layer_ops``'s result (an object with attributes, or a tuple)."""
    if hasattr(res, name):
        return getattr(res, name)
    if isinstance(res, tuple) and len(res) > index:
        return res[index]
    return default


@dataclass(frozen=True)
class _MoeRow:
    ops: list[OpSpec]          # the layer's MoE ops, experts collapsed into one placeholder
    expert_us: np.ndarray      # [ep]
    comp_us: float             # compute of the non-expert MoE ops
    comm_us: float
    dropped: float             # shares of the token-slots
    rerouted: float
    names: tuple[str, ...]
    stall_us: float = 0.0         # eager launch stalls of the layer's ops (step.with_launch)
    host_us: float = 0.0          # host dispatch of its eager kernels
    expert_stall_us: float = 0.0  # the experts' share of ``stall_us``


def _stall_host(o: OpCost) -> tuple[float, float]:
    """(eager launch stall, host dispatch) µs of one launched op (``step.with_launch``)."""
    return (o.launch_us, o.host_us) if o.host_us > 0.0 else (0.0, 0.0)


class PlanBuilder:
    """Builds :class:`StepPlan` objects for one scenario, caching the load-independent part of
    each batch shape (its balanced ``build_step``) and each MoE layer's ops per distinct
    routing row."""

    def __init__(self, sc: Scenario) -> None:
        from .. import step as step_mod  # the functions build_step uses for one MoE layer

        self.sc = sc
        self.topo = Topology.of(sc)
        m = sc.model
        self._moe_layer_ops: Callable = step_mod.moe_layer_ops
        self._with_launch: Callable = step_mod.with_launch
        self._base: dict[Batch, tuple] = {}
        self._rows: dict[tuple, _MoeRow] = {}
        self._hidden: dict[Batch, tuple] = {}  # batch -> base parts with no stall left
        self._stall_scale: Callable = step_mod.stall_scale
        pp, L = self.topo.pp, m.num_layers
        layers, moe_idx = [], 0
        for i, (att, mlp) in enumerate(zip(m.layer_attention, m.layer_mlp)):
            stage = min(pp - 1, i * pp // L)
            layers.append((f"{att}_attention+{mlp}", stage, moe_idx if mlp == "moe" else -1))
            moe_idx += mlp == "moe"
        self.layers = layers
        self.num_moe_layers = moe_idx
        self.moe_stage = np.array([s for _, s, j in layers if j >= 0], dtype=np.int64)
        # Sorting a load row does not change its cost when every expert lives on the one EP
        # rank (the cost depends on the multiset of loads only): more cache hits.
        self._sortable = self.topo.ep == 1 and sc.routing.placement != "eplb"

    # -- one MoE layer ----------------------------------------------------------------------------
    def _moe_row(self, b: Batch, row: np.ndarray) -> _MoeRow:
        if self._sortable:
            row = np.sort(row)
        key = (b.phase, b.num_seqs, b.new_tokens, row.tobytes())
        hit = self._rows.get(key)
        if hit is not None:
            return hit
        sc, topo = self.sc, self.topo
        res = self._moe_layer_ops(sc, b, row)
        raw_ops = _field(res, "ops", 0)
        rank_us = np.asarray(_field(res, "rank_us", 1), dtype=float)
        drop = float(_field(res, "dropped", 2, 0.0))
        rer = float(_field(res, "rerouted", 3, 0.0))
        ops: list[OpSpec] = []
        names: list[str] = []
        launched_experts = 0.0
        comp = comm = stall = host = expert_stall = 0.0
        for o in raw_ops:
            lo = self._with_launch(sc, b, o)
            st, h = _stall_host(lo)
            stall, host = stall + st, host + h
            if _is_expert(o):
                expert_stall += st
                launched_experts += lo.total_us
                names.append(o.name)
                if not ops or not ops[-1].expert:
                    ops.append(OpSpec("experts", "moe", COMPUTE, 0.0, expert=True))
                continue
            if lo.category == "comm" and lo.total_us == 0.0:
                continue
            spec = _spec(sc, topo, lo)
            ops.append(spec)
            if spec.stream == COMPUTE:
                comp += spec.dur_us
            else:
                comm += spec.dur_us
        # ``raw_ops`` holds the slowest rank's experts; launch / CUDA-graph replay changes their
        # time by the same amount on every rank running the same kernels.
        expert_us = rank_us + (launched_experts - float(rank_us.max()))
        out = _MoeRow(ops, expert_us, comp, comm, drop, rer, tuple(names), stall, host,
                      expert_stall)
        self._rows[key] = out
        return out

    # -- the load-independent part -------------------------------------------------------------
    def _base_parts(self, b: Batch):
        hit = self._base.get(b)
        if hit is not None:
            return hit
        sc, topo = self.sc, self.topo
        # balanced routing; each MoE layer's ops come from its row; the eager stalls as if each
        # op ran alone (plan applies step.overlap_host to the whole step)
        step = build_step(sc, b, host_overlap=False)
        moe_names: set[str] = set()
        if self.num_moe_layers:
            mo = sc.model.moe
            row = balanced_loads(b.tokens * topo.dp, mo.num_experts, mo.top_k)
            res = self._moe_layer_ops(sc, b, row)
            moe_names = {o.name for o in _field(res, "ops", 0)}
        moe_kinds = {k for k, _, j in self.layers if j >= 0}
        templates: dict[str, list[OpSpec]] = {}
        head_pre, head_post = [], []
        pp_send, engine_us = None, 0.0
        for o in step.ops:
            k = o.layer_kind
            if o.category == "overhead":
                engine_us += o.total_us
            elif k == "head":
                (head_pre if o.name == "embedding" else head_post).append(_spec(sc, topo, o))
            elif k == "pipeline":
                pp_send = _comm_spec(sc, topo, o)
            else:
                ops = templates.setdefault(k, [])
                if k in moe_kinds and (o.name in moe_names or _is_expert(o)):
                    continue  # priced per layer from its routing sample
                if o.category == "comm" and o.total_us == 0.0:
                    continue
                ops.append(_spec(sc, topo, o))
        sums = _stage_sums(topo, templates, self.layers, head_pre, head_post, pp_send)
        sums["stall_host"] = _plan_stall_host(templates, self.layers, head_pre, head_post,
                                              pp_send, topo.pp)
        hit = (templates, head_pre, head_post, pp_send, engine_us, sums)
        self._base[b] = hit
        return hit

    def _scaled_spec(self, o: OpSpec, f: float) -> OpSpec:
        """``o`` with its eager launch stall scaled by ``f`` (``step.overlap_host``)."""
        op = o.op
        if op is None or op.host_us <= 0.0 or op.launch_us <= 0.0:
            return o
        return _spec(self.sc, self.topo, replace(op, launch_us=op.launch_us * f))

    def _scaled_base(self, templates: dict[str, list[OpSpec]],
                     head_pre: list[OpSpec], head_post: list[OpSpec],
                     pp_send: Optional[OpSpec], f: float) -> tuple:
        sc_spec = self._scaled_spec
        templates = {k: [sc_spec(o, f) for o in ops] for k, ops in templates.items()}
        head_pre = [sc_spec(o, f) for o in head_pre]
        head_post = [sc_spec(o, f) for o in head_post]
        if pp_send is not None and pp_send.op is not None and pp_send.op.host_us > 0.0:
            pp_send = _comm_spec(self.sc, self.topo,
                                 replace(pp_send.op, launch_us=pp_send.op.launch_us * f))
        sums = _stage_sums(self.topo, templates, self.layers, head_pre, head_post, pp_send)
        return templates, head_pre, head_post, pp_send, sums

    def _scaled_row(self, r: _MoeRow, f: float) -> _MoeRow:
        if r.stall_us <= 0.0:
            return r
        ops = [self._scaled_spec(o, f) for o in r.ops]
        comp = sum(o.dur_us for o in ops if o.stream == COMPUTE and not o.expert)
        comm = sum(o.dur_us for o in ops if o.stream != COMPUTE)
        return replace(r, ops=ops, comp_us=comp, comm_us=comm,
                       expert_us=r.expert_us - (1.0 - f) * r.expert_stall_us,
                       stall_us=r.stall_us * f, expert_stall_us=r.expert_stall_us * f)

    def plan(self, b: Batch, loads: Optional[np.ndarray] = None) -> StepPlan:
        """The plan of batch ``b`` (one attention-DP group's work) with MoE ``loads``
        ``[num_moe_layers, num_experts]`` of all tokens meeting in each MoE layer (``None``:
        balanced)."""
        sc, topo = self.sc, self.topo
        templates, head_pre, head_post, pp_send, engine_us, sums = self._base_parts(b)
        mo = sc.model.moe
        L = self.num_moe_layers
        dropped = rerouted = routed = 0.0
        moe_ops: list[list[OpSpec]] = []
        rows: list[_MoeRow] = []
        names: tuple[str, ...] = ()
        if mo is None or L == 0:
            expert_us = np.zeros((0, topo.ep))
            moe_comp = moe_comm = np.zeros(0)
        else:
            t_global = b.tokens * topo.dp
            if loads is None:
                loads = np.broadcast_to(balanced_loads(t_global, mo.num_experts, mo.top_k),
                                        (L, mo.num_experts))
            loads = np.asarray(loads)
            if loads.strides[0] == 0 or bool(np.all(loads == loads[0])):
                rows = [self._moe_row(b, np.ascontiguousarray(loads[0]))] * L
            else:
                rows = [self._moe_row(b, np.ascontiguousarray(loads[j])) for j in range(L)]
            moe_ops = [r.ops for r in rows]
            expert_us = np.stack([r.expert_us for r in rows])
            moe_comp = np.array([r.comp_us for r in rows])
            moe_comm = np.array([r.comm_us for r in rows])
            slots = t_global * mo.top_k
            dropped = slots * sum(r.dropped for r in rows)
            rerouted = slots * sum(r.rerouted for r in rows)
            routed = float(slots * L)
            names = rows[0].names
        # step.overlap_host: the host runs ahead of the GPU, the step's eager stalls shrink to
        # max(0, host - GPU time) of the whole step (the serial sum, as build_step counts it)
        stall, host = sums["stall_host"]
        stall += sum(r.stall_us for r in rows)
        if stall > 0.0:
            host += sum(r.host_us for r in rows)
            gpu = sums["serial"] + float(moe_comp.sum() + moe_comm.sum()) - stall
            if len(expert_us):
                gpu += float(expert_us.max(axis=1).sum())
            f = self._stall_scale(stall, host, gpu)
            if f < 1.0:
                # a GPU-bound step (f = 0) hides every stall whatever its loads: kept per batch
                scaled = self._hidden.get(b) if f == 0.0 else None
                if scaled is None:
                    scaled = self._scaled_base(templates, head_pre, head_post, pp_send, f)
                    if f == 0.0:
                        self._hidden[b] = scaled
                templates, head_pre, head_post, pp_send, sums = scaled
                rows = [self._scaled_row(r, f) for r in rows]
                if rows:
                    moe_ops = [r.ops for r in rows]
                    expert_us = np.stack([r.expert_us for r in rows])
                    moe_comp = np.array([r.comp_us for r in rows])
                    moe_comm = np.array([r.comm_us for r in rows])
        pp = topo.pp
        comp = sums["comp"] + np.bincount(self.moe_stage, moe_comp, minlength=pp)[:pp]
        comm = sums["comm"] + np.bincount(self.moe_stage, moe_comm, minlength=pp)[:pp]
        plan_sums = dict(sums, comp=comp, comm=comm,
                         serial=sums["serial"] + float(moe_comp.sum() + moe_comm.sum()),
                         moe_stage=self.moe_stage)
        return StepPlan(b, topo, templates, moe_ops, self.layers, head_pre, head_post, pp_send,
                        engine_us, expert_us, names, dropped, rerouted, routed, plan_sums)


# ---------------------------------------------------------------------------------------------
# closed form (no overlap)
# ---------------------------------------------------------------------------------------------

def _plan_stall_host(templates: dict[str, list[OpSpec]], layers: list[tuple[str, int, int]],
                     head_pre: list[OpSpec], head_post: list[OpSpec],
                     pp_send: Optional[OpSpec], pp: int) -> tuple[float, float]:
    """(eager launch stalls, host dispatch) µs of a step's load-independent ops."""
    def sums(ops: list[OpSpec]) -> tuple[float, float]:
        st = h = 0.0
        for o in ops:
            if o.op is not None:
                a, c = _stall_host(o.op)
                st, h = st + a, h + c
        return st, h

    per_kind = {k: sums(ops) for k, ops in templates.items()}
    stall = host = 0.0
    for kind, _, _ in layers:
        a, c = per_kind.get(kind, (0.0, 0.0))
        stall, host = stall + a, host + c
    for a, c in (sums(head_pre), sums(head_post)):
        stall, host = stall + a, host + c
    if pp_send is not None and pp_send.op is not None:
        a, c = _stall_host(pp_send.op)
        stall, host = stall + a * (pp - 1), host + c * (pp - 1)
    return stall, host


def _stage_sums(topo: Topology, templates: dict[str, list[OpSpec]],
                layers: list[tuple[str, int, int]], head_pre: list[OpSpec],
                head_post: list[OpSpec], pp_send: Optional[OpSpec]) -> dict[str, Any]:
    """Per-stage compute and comm microseconds of the layer templates, the head and the
    pipeline sends, and their serial time (stages one after the other)."""
    pp = topo.pp
    comp = np.zeros(pp)
    comm = np.zeros(pp)
    per_kind = {k: (sum(o.dur_us for o in ops if o.stream == COMPUTE),
                    sum(o.dur_us for o in ops if o.stream == COMM))
                for k, ops in templates.items()}
    for kind, stage, _ in layers:
        c, m = per_kind.get(kind, (0.0, 0.0))
        comp[stage] += c
        comm[stage] += m
    for o in head_pre:
        (comp if o.stream == COMPUTE else comm)[0] += o.dur_us
    for o in head_post:
        (comp if o.stream == COMPUTE else comm)[pp - 1] += o.dur_us
    pp_us = pp_send.dur_us if pp_send is not None else 0.0
    serial = float(comp.sum() + comm.sum()) + pp_us * (pp - 1)
    if pp > 1:  # a send occupies the comm streams of both its stages
        comm[:-1] += pp_us
        comm[1:] += pp_us
    ranks = np.arange(topo.n_ranks)
    return {"comp": comp, "comm": comm, "serial": serial,
            "stage_of": ranks // topo.stage_size,
            "ep_of": (ranks % topo.stage_size) // topo.moe_tp}


def closed_form(plan: StepPlan) -> StepCost:
    """Step time and per-rank busy / waiting times when nothing overlaps: collectives
    synchronise their group, so each MoE layer lasts as long as its slowest rank's experts."""
    topo = plan.topo
    s = plan._sums
    stage_of, ep_of = s["stage_of"], s["ep_of"]
    E = plan.expert_us
    if E.shape[0]:
        emax = E.max(axis=1)
        t = s["serial"] + float(emax.sum()) + plan.engine_us
        # [ranks]: each rank's expert time and waiting over the MoE layers of its stage
        in_stage = s["moe_stage"][:, None] == stage_of[None, :]             # [L_moe, ranks]
        mine = E[:, ep_of]                                                   # [L_moe, ranks]
        expert = (mine * in_stage).sum(axis=0)
        wait = ((emax[:, None] - mine) * in_stage).sum(axis=0)
    else:
        t = s["serial"] + plan.engine_us
        expert = np.zeros(topo.n_ranks)
        wait = np.zeros(topo.n_ranks)
    return StepCost(t, s["comp"][stage_of] + expert, s["comm"][stage_of].copy(), wait,
                    plan.dropped_slots, plan.rerouted_slots, plan.routed_slots)


# ---------------------------------------------------------------------------------------------
# simpy
# ---------------------------------------------------------------------------------------------

class Fabric:
    """Link ports as processor-sharing resources: a transfer of ``work_us`` (its time alone on
    the link) crossing several ports advances at ``1 / max(active transfers on each port)``."""

    _EPS = 1e-9

    def __init__(self, env: simpy.Environment) -> None:
        self.env = env
        self.active: dict[int, list] = {}  # id -> [remaining_us, ports, event]
        self.load: dict[Any, int] = {}
        self.last = 0.0
        self.gen = 0
        self.next_id = 0

    def _rate(self, ports) -> float:
        return 1.0 / max(self.load[p] for p in ports)

    def _advance(self) -> None:
        now = self.env.now
        dt = now - self.last
        if dt > 0:
            for item in self.active.values():
                item[0] -= dt * self._rate(item[1])
        self.last = now

    def transfer(self, work_us: float, ports: tuple) -> simpy.Event:
        ev = self.env.event()
        if work_us <= 0:
            ev.succeed()
            return ev
        self._advance()
        self.active[self.next_id] = [work_us, ports, ev]
        self.next_id += 1
        for p in ports:
            self.load[p] = self.load.get(p, 0) + 1
        self._reschedule()
        return ev

    def _reschedule(self) -> None:
        self.gen += 1
        if not self.active:
            return
        gen = self.gen
        dt = min(item[0] / self._rate(item[1]) for item in self.active.values())
        timer = self.env.timeout(max(dt, 0.0))
        timer.callbacks.append(lambda _ev: self._on_timer(gen))

    def _on_timer(self, gen: int) -> None:
        if gen != self.gen:
            return
        self._advance()
        done = [k for k, item in self.active.items()
                if item[0] <= self._EPS * max(1.0, abs(self.env.now))]
        for k in done:
            _, ports, ev = self.active.pop(k)
            for p in ports:
                self.load[p] -= 1
            ev.succeed()
        self._reschedule()


class _Barrier:
    __slots__ = ("n", "arrived", "start", "done", "t0", "t1")

    def __init__(self, env: simpy.Environment, n: int) -> None:
        self.n = n
        self.arrived = 0
        self.start = env.event()
        self.done = env.event()
        self.t0 = self.t1 = 0.0


@dataclass
class TraceEvent:
    rank: int      # -1: the engine/host track
    stream: str    # 'compute', 'comm', 'comm mb1', 'host'
    name: str
    start_us: float
    dur_us: float
    args: dict


def _program(plan: StepPlan, stage: int, ov: OverlapSpec) -> list[tuple]:
    """The instruction list of one micro-batch on a rank of ``stage``: ('s', [(op, moe_layer
    or -1), ...]) a run of compute ops (experts: moe_layer >= 0), ('m', op, handle) collective
    (handle None: blocking), ('w', handle) wait for an async collective, ('recv',) / ('send',)
    pipeline transfers."""
    topo = plan.topo
    prog: list[tuple] = []
    if stage > 0:
        prog.append(("recv",))
    else:
        prog += [("c", o) if o.stream == COMPUTE else ("m", o, None) for o in plan.head_pre]
    pending: Optional[int] = None   # an async collective the next layer must wait for
    handle = 0
    for kind, s, moe_j in plan.layers:
        if s != stage:
            continue
        ops = plan.templates.get(kind, [])
        if moe_j >= 0:
            ops = ops + plan.moe_ops[moe_j]
        if moe_j >= 0 and ov.shared_expert_dispatch:
            # dispatch runs while the shared experts compute; experts wait for it
            names = [o.name for o in ops]
            if "dispatch" in names and any(n.startswith("shared_expert") for n in names):
                shared = [o for o in ops if o.name.startswith("shared_expert")]
                rest = [o for o in ops if not o.name.startswith("shared_expert")]
                new: list[OpSpec] = []
                for o in rest:
                    if o.expert:
                        new.extend(shared)
                    new.append(o)
                ops = new
        last_comm = max((i for i, o in enumerate(ops) if o.stream == COMM), default=-1)
        dispatch_handle = None
        for i, o in enumerate(ops):
            if pending is not None and o.name == "norms_rope":
                prog.append(("w", pending))
                pending = None
            if o.expert:
                if dispatch_handle is not None:
                    prog.append(("w", dispatch_handle))
                    dispatch_handle = None
                prog.append(("x", o, moe_j))
            elif o.stream == COMPUTE:
                prog.append(("c", o))
            elif o.name == "dispatch" and ov.shared_expert_dispatch:
                handle += 1
                dispatch_handle = handle
                prog.append(("m", o, handle))
            elif i == last_comm and moe_j >= 0 and ov.attention_combine \
                    and o.name in ("combine", "moe_all_reduce"):
                if pending is not None:
                    prog.append(("w", pending))
                handle += 1
                pending = handle
                prog.append(("m", o, handle))
            else:
                if pending is not None:
                    prog.append(("w", pending))
                    pending = None
                prog.append(("m", o, None))
        if dispatch_handle is not None:
            prog.append(("w", dispatch_handle))
    if pending is not None:
        prog.append(("w", pending))
    if stage < topo.pp - 1:
        prog.append(("send",))
    else:
        prog += [("c", o) if o.stream == COMPUTE else ("m", o, None) for o in plan.head_post]
    return _segments(prog)


def _segments(prog: list[tuple]) -> list[tuple]:
    """Merge runs of compute instructions into ('s', [(op, moe_layer or -1), ...]): a run
    occupies the compute stream back to back (micro-batches interleave between runs, at the
    points where one waits for a collective — how two-batch overlap schedules them)."""
    out: list[tuple] = []
    run: list[tuple[OpSpec, int]] = []
    for ins in prog:
        if ins[0] == "c":
            run.append((ins[1], -1))
        elif ins[0] == "x":
            run.append((ins[1], ins[2]))
        else:
            if run:
                out.append(("s", run))
                run = []
            out.append(ins)
    if run:
        out.append(("s", run))
    return out


def simulate_step(plans: list[StepPlan], overlap: OverlapSpec = OverlapSpec(),
                  record: Optional[list[TraceEvent]] = None) -> StepCost:
    """Run one step (``plans``: one per micro-batch, run concurrently) on every rank with simpy.
    ``record``: a list that receives the op-level timeline (start at 0).

    Ranks that hold the same experts in the same stage run identical programs with identical
    durations and meet the same peers, so one representative of each such class is simulated
    and its timeline stands for the others (a tensor-parallel group of 8 costs one rank)."""
    topo = plans[0].topo
    n = topo.n_ranks
    rep = _representatives(topo)
    reps = sorted(set(rep))
    env = simpy.Environment()
    compute = [simpy.Resource(env, 1) for _ in range(n)]
    comm = [[simpy.Resource(env, 1) for _ in plans] for _ in range(n)]
    fabric = Fabric(env)
    barriers: dict[tuple, _Barrier] = {}
    comp_us = np.zeros(n)
    comm_us = np.zeros(n)
    wait_us = np.zeros(n)
    finish = np.zeros(n)
    multi = len(plans) > 1

    def comm_stream(mb: int) -> str:
        return COMM + (f" mb{mb}" if multi else "")

    def collective(r: int, mb: int, o: OpSpec, key: tuple, members: tuple, counts_wait: bool):
        req = comm[r][mb].request()
        yield req
        t_arr = env.now
        b = barriers.get(key)
        if b is None:
            b = barriers[key] = _Barrier(env, len(members))
        b.arrived += 1
        if b.arrived == b.n:
            env.process(run(b, o, members))
        yield b.start
        if counts_wait:
            wait_us[r] += b.t0 - t_arr
        yield b.done
        comm_us[r] += b.t1 - b.t0
        comm[r][mb].release(req)
        if record is not None:
            record.append(TraceEvent(r, comm_stream(mb), o.name, b.t0, b.t1 - b.t0,
                                     {"group": o.group, "port": o.port,
                                      "latency_us": round(o.latency_us, 3),
                                      "transfer_us_alone": round(o.transfer_us, 3)}))

    def run(b: _Barrier, o: OpSpec, members: tuple):
        b.t0 = env.now
        b.start.succeed()
        if o.latency_us > 0:
            yield env.timeout(o.latency_us)
        if o.transfer_us > 0:
            yield fabric.transfer(o.transfer_us, tuple((m, o.port) for m in members))
        b.t1 = env.now
        b.done.succeed()

    def rank_proc(r: int, mb: int, plan: StepPlan, prog: list[tuple]):
        ep = topo.ep_rank(r)
        handles: dict[int, simpy.Process] = {}
        seq = 0
        stage = topo.stage(r)
        for ins in prog:
            tag = ins[0]
            if tag == "s":
                run = ins[1]
                E = plan.expert_us
                d = 0.0
                for o, j in run:
                    d += o.dur_us if j < 0 else float(E[j, ep])
                req = compute[r].request()
                yield req
                t0 = env.now
                if d > 0:
                    yield env.timeout(d)
                compute[r].release(req)
                comp_us[r] += d
                if record is not None:
                    t = t0
                    for o, j in run:
                        dj = o.dur_us if j < 0 else float(E[j, ep])
                        args = {"mb": mb} if multi else {}
                        if j >= 0:
                            args["ops"] = ", ".join(plan.expert_names)
                            args["moe_layer"] = j
                        elif o.op is not None:
                            args["bound"] = o.op.bound
                        record.append(TraceEvent(r, COMPUTE, o.name, t, dj, args))
                        t += dj
            elif tag == "m":
                o, h = ins[1], ins[2]
                seq += 1
                members = tuple(sorted({rep[m] for m in topo.group(o.group, r)}))
                key = (mb, stage, seq, members[0])
                p = env.process(collective(r, mb, o, key, members, True))
                if h is None:
                    yield p
                else:
                    handles[h] = p
            elif tag == "w":
                yield handles.pop(ins[1])
            elif tag in ("send", "recv"):
                peer = r + topo.stage_size if tag == "send" else r - topo.stage_size
                lo = min(r, peer)
                key = ("pp", mb, topo.stage(lo), lo)
                yield env.process(collective(r, mb, plan.pp_send, key, (lo, lo + topo.stage_size),
                                             False))
        finish[r] = max(finish[r], env.now)

    for mb, plan in enumerate(plans):
        progs = {s: _program(plan, s, overlap) for s in range(topo.pp)}
        for r in reps:
            env.process(rank_proc(r, mb, plan, progs[topo.stage(r)]))
    env.run()
    idx = np.asarray(rep)
    comp_us, comm_us, wait_us, finish = comp_us[idx], comm_us[idx], wait_us[idx], finish[idx]
    if record is not None and len(reps) < n:
        others = {q: [r for r in range(n) if rep[r] == q and r != q] for q in reps}
        record.extend([TraceEvent(r, e.stream, e.name, e.start_us, e.dur_us, e.args)
                       for e in list(record) if e.rank >= 0 for r in others[e.rank]])
    end = float(finish.max())
    engine = plans[0].engine_us
    if record is not None and engine > 0:
        record.append(TraceEvent(-1, "host", "engine_step", end, engine, {}))
    return StepCost(end + engine, comp_us, comm_us, wait_us,
                    sum(p.dropped_slots for p in plans), sum(p.rerouted_slots for p in plans),
                    sum(p.routed_slots for p in plans))


def _representatives(topo: Topology) -> list[int]:
    """``rep[r]``: the lowest rank of ``r``'s class (same stage, same EP rank), when every member
    of every class meets the same classes in its TP and stage groups; else every rank is its
    own representative."""
    n = topo.n_ranks
    cls = [(topo.stage(r), topo.ep_rank(r)) for r in range(n)]
    first: dict[tuple, int] = {}
    for r in range(n):
        first.setdefault(cls[r], r)
    sig: dict[tuple, tuple] = {}
    for r in range(n):
        mine = tuple(frozenset(cls[m] for m in topo.group(k, r)) for k in ("tp", "stage"))
        if sig.setdefault(cls[r], mine) != mine:
            return list(range(n))
    return [first[cls[r]] for r in range(n)]


# ---------------------------------------------------------------------------------------------
# convenience
# ---------------------------------------------------------------------------------------------

def split_batch(b: Batch) -> list[Batch]:
    """Two micro-batches of ``b`` (two-batch overlap): sequences split in halves; a single
    prefill sequence is split into two consecutive chunks; a single decode sequence is not
    split."""
    if b.num_seqs >= 2:
        a = (b.num_seqs + 1) // 2
        return [Batch(b.phase, a, b.new_tokens, b.context),
                Batch(b.phase, b.num_seqs - a, b.new_tokens, b.context)]
    if b.new_tokens >= 2:
        a = (b.new_tokens + 1) // 2
        return [Batch(b.phase, 1, a, b.context),
                Batch(b.phase, 1, b.new_tokens - a, b.context + a)]
    return [b]


def step_plans(builder: PlanBuilder, b: Batch, overlap: OverlapSpec,
               draw: Optional[Callable[[int], Optional[np.ndarray]]] = None) -> list[StepPlan]:
    """The micro-batch plans of batch ``b``; ``draw(tokens_per_group)`` gives a routing sample
    (``None``: balanced)."""
    parts = split_batch(b) if overlap.two_batch else [b]
    return [builder.plan(p, draw(p.tokens) if draw is not None else None) for p in parts]


def step_cost(builder: PlanBuilder, b: Batch, overlap: OverlapSpec = OverlapSpec(),
              draw=None, record: Optional[list[TraceEvent]] = None,
              force_simpy: bool = False) -> StepCost:
    """Cost of one step: the closed form when nothing overlaps (and no timeline is wanted),
    the simpy simulation otherwise."""
    plans = step_plans(builder, b, overlap, draw)
    if overlap.any or record is not None or force_simpy:
        return simulate_step(plans, overlap, record)
    return closed_form(plans[0])


def simulate_one_step(sc: Scenario, b: Batch, loads: Optional[np.ndarray] = None,
                      overlap: OverlapSpec = OverlapSpec(),
                      record: Optional[list[TraceEvent]] = None) -> StepCost:
    """One step of ``sc`` on every rank with simpy (``loads``: MoE loads of the whole batch,
    ``[num_moe_layers, num_experts]``; with ``overlap.two_batch`` each micro-batch is priced
    balanced unless ``loads`` is None)."""
    builder = PlanBuilder(sc)
    if overlap.two_batch:
        return simulate_step(step_plans(builder, b, overlap), overlap, record)
    return simulate_step([builder.plan(b, loads)], overlap, record)
