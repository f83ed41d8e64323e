"""What a run reports at its end, for every front end (the CLI loop and the Trainer): the summary
(``summary.json``) and its markdown table."""

from __future__ import annotations

from .config.schema import TICKET_SCHEDULES


def final_label(engine) -> str:
    """What the final model is: S_M after the whole plan, else the training model where it stopped."""
    total = engine.plan.total_steps
    if engine.step < total:
        return f"training model at step {engine.step} of {total} (stopped early)"
    return f"S_{engine.num_tickets}" if engine.num_tickets else "final (no tickets)"


def run_summary(engine, results: dict, *, skipped_steps: int, world_size: int, **extra) -> dict:
    """P, each T_i, each S_i and the final model (``results``), the plan and the run's facts."""
    plan = engine.plan
    return {
        "results": results,
        "final_is": final_label(engine),
        "plan": {
            "total_steps": plan.total_steps,
            "pre_steps": plan.pre_steps,
            "num_cycles": plan.num_cycles,
            "cycle_steps": plan.cycle_steps,
            "cycles_fraction": plan.cycles_fraction,
            "ticket_schedule": engine.tickets.schedule,
        },
        "steps_completed": engine.step,
        "skipped_steps": skipped_steps,
        **extra,
        "method": engine.sparse.method,
        "density": engine.sparse.density,
        "world_size": world_size,
        "parallelism": engine.backend.kind,
    }


def describe_tickets(plan: dict) -> str:
    """'3 tickets (15% of the budget in cycles)', or where the tickets came from with the tail."""
    n, share = plan["num_cycles"], f"{100 * plan['cycles_fraction']:.0f}%"
    spec = TICKET_SCHEDULES[plan.get("ticket_schedule", "cycles")]
    if not spec.cyclic_lr:
        return f"{n} tickets from the last {share} of the base schedule (tail)"
    after = ", after the base run's own LR schedule (tail_cycles)" if spec.base_lr_over_whole_budget else ""
    return f"{n} tickets ({share} of the budget in cycles{after})"


def summary_table(summary: dict) -> str:
    """Markdown table: P, each ticket, each superposition and the final model."""
    rows = ["| model | accuracy | loss | density | step |", "|---|---|---|---|---|"]
    for label, r in summary["results"].items():
        name = f"final = {summary['final_is']}" if label == "final" else label
        rows.append(
            f"| {name} | {100 * r['accuracy']:.2f}% | {r['loss']:.4f} | {r['density']:.4f} | {r['step']} |"
        )
    return "\n".join(rows)
