"""What people look at: tables, JSON, Markdown and CSV of the results, charts, the HTML report
and the side-by-side comparison of variants. It renders results computed elsewhere, and calls
nothing that computes them."""
