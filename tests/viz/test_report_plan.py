"""The budget planner's section of the HTML report: every alternative a row, and the
recommendation, from a plan built by hand (the report computes nothing), in the words the
terminal prints."""

from ninlab.analysis.planner import BudgetPlan, PlanOption
from ninlab.analysis.step import StepSpec
from ninlab.viz.render_plan import plan_html, plan_lines, plan_table


def test_the_plan_section_shows_every_alternative_and_the_recommendation() -> None:
    spec = StepSpec()
    options = (
        PlanOption("as given", "as given", spec, 100, 9 << 30, False, 10**12, 0),
        PlanOption(
            "checkpoint <all>", "checkpointing", spec, 150, 7 << 30, True, 12 * 10**11, 2 * 10**11
        ),
        PlanOption(
            "accumulate 2 x 64",
            "accumulation",
            spec,
            128,
            5 << 30,
            True,
            10**12,
            0,
            micro_batches=2,
        ),
        PlanOption(
            "bf16 autocast",
            "autocast",
            spec,
            180,
            6 << 30,
            True,
            10**12,
            0,
            peak_lower_bound=True,
            largest_at_most=True,
        ),
    )
    plan = BudgetPlan(8 << 30, 128, spec, options, "use accumulate 2 x 64: batch 128 fits 8 GiB")
    assert plan.recommended is options[2]  # fits, and no extra compute
    html = plan_html(plan)
    assert "Fitting batch 128 into 8.00 GiB" in html
    assert "checkpoint &lt;all&gt;" in html and "batch 128 in 2 micro-batches" in html
    assert html.count("<tr>") == 1 + len(options)
    # a bf16 kernel's workspace not modelled: the peak is a lower bound, the largest batch an
    # upper one
    assert "at most 180" in html and "at least 6.00 GiB" in html
    assert "<b>Recommendation:</b> use accumulate 2 x 64" in html

    # The terminal's lines are the table's rows, in the same words.
    for line, row in zip(plan_lines(plan)[1:-1], plan_table(plan).rows, strict=True):
        assert line == f"  {row[0]}: {row[1]}; batch 128 {row[2]} ({row[3]}); {row[4]} per step"
