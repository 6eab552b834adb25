"""Held-out evaluation: greedy completions scored by the task, sharded over processes.

A task scores either per sample (`score`, averaged) or, when it defines `metrics(completions, rows)`,
over the whole split at once (e.g. COCO mAP, which ranks detections across images). In that case
every process gathers all completions in row order and computes the same numbers.

A task that defines `sample_grid(completions, rows) -> PIL.Image` (image generators) gets its held-out
samples drawn into `samples_to` by the main process, so a run keeps a visual record of every
evaluation (reward hacking shows there first).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def evaluate(policy, task, split: str, max_prompts: int, batch_size: int, accelerator=None,
             samples_to=None, revision_template: str | None = None) -> dict[str, float]:
    """Held-out metrics; with `revision_template` (two-attempt runs) also the second attempt's."""
    rows = task.split(split)[:max_prompts]
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    mine = list(range(rank, len(rows), world))
    completions: list = []
    for s in range(0, len(mine), batch_size):
        completions += policy.complete([rows[i] for i in mine[s : s + batch_size]])
    corpus = hasattr(task, "metrics")
    if revision_template is not None and not corpus:
        return _two_attempt_metrics(policy, task, [rows[i] for i in mine], completions, batch_size, accelerator,
                                    revision_template)
    if corpus:
        done = list(zip(mine, completions))
    else:
        done = task.score(completions, [rows[i] for i in mine])
    if accelerator is not None and world > 1:
        from accelerate.utils import gather_object

        done = gather_object(done)
    if corpus:
        ordered = [c for _, c in sorted(done, key=lambda x: x[0])]
        if samples_to is not None and hasattr(task, "sample_grid") and (accelerator is None or accelerator.is_main_process):
            from pathlib import Path

            Path(samples_to).parent.mkdir(parents=True, exist_ok=True)
            task.sample_grid(ordered, rows).save(samples_to)
        return task.metrics(ordered, rows) | {"n": float(len(ordered))}
    return {task.metric: sum(done) / max(len(done), 1), "n": float(len(done))}


def _two_attempt_metrics(policy, task, rows, first, batch_size, accelerator, template) -> dict[str, float]:
    """metric (first attempt), metric@t2, delta_t1_t2, and the incorrect->correct / correct->incorrect fractions.

    With two agents (CORY, llm_rl/cory.py) the first attempt is the pioneer's, the second the observer's after
    seeing it (metric@t2: the pair), and the observer also answers alone (metric@observer); `pioneer_agent`
    says which copy is the pioneer."""
    from shared.attempts import revision_row

    observer = getattr(policy, "observer", None)
    answers_second = policy if observer is None else observer
    second: list = []
    alone: list = []
    for s in range(0, len(rows), batch_size):
        second += answers_second.complete([revision_row(r, c, template)
                                            for r, c in zip(rows[s : s + batch_size], first[s : s + batch_size])])
        if observer is not None:
            alone += observer.complete(rows[s : s + batch_size])
    triples = list(zip(task.score(first, rows), task.score(second, rows),
                       task.score(alone, rows) if observer is not None else [0.0] * len(rows)))
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        triples = gather_object(triples)
    n = max(len(triples), 1)
    t1, t2 = sum(p[0] for p in triples) / n, sum(p[1] for p in triples) / n
    out = {task.metric: t1, f"{task.metric}@t2": t2, "delta_t1_t2": t2 - t1,
           "i_to_c": sum(p[0] < p[1] for p in triples) / n, "c_to_i": sum(p[0] > p[1] for p in triples) / n,
           "n": float(len(triples))}
    if observer is not None:
        out |= {f"{task.metric}@observer": sum(p[2] for p in triples) / n, "pioneer_agent": float(policy.pioneer)}
    return out
