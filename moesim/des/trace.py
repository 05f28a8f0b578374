"""Chrome trace-event JSON of a simulation (open it in https://ui.perfetto.dev or
chrome://tracing).

Tracks: an ``engine`` process (one slice per step, the host overhead, and counters for the queue,
the running batch and KV-cache usage); one process per rank with a ``compute`` thread and one
``comm`` thread per micro-batch (op by op for the first ``trace_steps`` steps, one slice per step
afterwards); a ``requests`` process with one async track per request (queued, prefill, decode).
Format: the Trace Event Format document (``ph`` X / C / M / b / e, times in microseconds).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from ..errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from .serving import Engine, SimResult
    from .step_sim import TraceEvent

#: Requests drawn as async tracks at most (a trace stays small enough for the UI).
MAX_REQUEST_TRACKS = 1000


def _meta(pid: int, tid: int, kind: str, name: str, sort: int) -> list[dict]:
    ev = [{"ph": "M", "pid": pid, "tid": tid, "name": kind, "args": {"name": name}}]
    key = "process_sort_index" if kind == "process_name" else "thread_sort_index"
    ev.append({"ph": "M", "pid": pid, "tid": tid, "name": key, "args": {"sort_index": sort}})
    return ev


def chrome_events(events: list["TraceEvent"], eng: "Engine") -> list[dict[str, Any]]:
    topo = eng.pricer.builder.topo
    n = topo.n_ranks
    out: list[dict[str, Any]] = []
    out += _meta(0, 0, "process_name", "engine", 0)
    out += _meta(0, 1, "thread_name", "steps", 1)
    out += _meta(0, 2, "thread_name", "host", 2)
    tids: dict[tuple[int, str], int] = {}
    for r in range(n):
        out += _meta(r + 1, 0, "process_name", topo.label(r), r + 1)
        out += _meta(r + 1, 1, "thread_name", "compute", 1)
    for e in events:
        if e.rank < 0:
            pid, tid = 0, 1 if e.stream == "steps" else 2
        else:
            pid = e.rank + 1
            key = (e.rank, e.stream)
            tid = tids.get(key)
            if tid is None:
                tid = 1 if e.stream == "compute" else 2 + sum(1 for k in tids if k[0] == e.rank
                                                              and k[1] != "compute")
                tids[key] = tid
                if e.stream != "compute":
                    out += _meta(pid, tid, "thread_name", e.stream, tid)
        # integer nanoseconds first, so that back-to-back slices share their boundary exactly
        t0 = round(e.start_us * 1e3)
        t1 = max(t0, round((e.start_us + max(e.dur_us, 0.0)) * 1e3))
        ev = {"ph": "X", "pid": pid, "tid": tid, "name": e.name, "ts": t0 / 1e3,
              "dur": (t1 - t0) / 1e3}
        if e.args:
            ev["args"] = e.args
        out.append(ev)
    # counters, one sample per step end
    total = max(eng.total_blocks, 1)
    for t, w, r, kv in zip(eng.series_t, eng.series_wait, eng.series_run, eng.series_kv):
        ts = round(t, 3)
        out.append({"ph": "C", "pid": 0, "name": "requests", "ts": ts,
                    "args": {"waiting": w, "running": r}})
        out.append({"ph": "C", "pid": 0, "name": "kv_cache_usage", "ts": ts,
                    "args": {"fraction": round(kv / total, 5)}})
    # requests
    rp = n + 1
    out += _meta(rp, 0, "process_name", "requests", rp)
    for req in sorted(eng.done, key=lambda q: q.id)[:MAX_REQUEST_TRACKS]:
        rid = req.id
        name = f"request {rid}"
        args = {"input_len": req.prompt, "output_len": req.out, "preemptions": req.preempt}
        phases = [("queued", req.arrival, req.first_sched), ("prefill", req.first_sched,
                                                              req.first_token),
                  ("decode", req.first_token, req.finish)]
        out.append({"ph": "b", "cat": "request", "id": rid, "pid": rp, "tid": 0, "name": name,
                    "ts": round(req.arrival, 3), "args": args})
        for label, a, b in phases:
            if a < 0 or b < a:
                continue
            out.append({"ph": "b", "cat": "request", "id": rid, "pid": rp, "tid": 0,
                        "name": label, "ts": round(a, 3)})
            out.append({"ph": "e", "cat": "request", "id": rid, "pid": rp, "tid": 0,
                        "name": label, "ts": round(b, 3)})
        out.append({"ph": "e", "cat": "request", "id": rid, "pid": rp, "tid": 0, "name": name,
                    "ts": round(req.finish, 3)})
    return out


def write_chrome_trace(path: Union[str, Path], events: list["TraceEvent"], eng: "Engine",
                       result: "SimResult") -> None:
    doc = {"traceEvents": chrome_events(events, eng), "displayTimeUnit": "ms",
           "otherData": {"scenario": result.scenario, "seed": result.seed,
                         "requests_completed": result.metrics["requests_completed"]}}
    p = Path(path)
    try:
        with p.open("w") as fh:
            json.dump(doc, fh, separators=(",", ":"))
    except OSError as exc:
        raise InputError("trace", f"cannot write {p}: {exc.strerror or exc}",
                         "give a writable path") from None
