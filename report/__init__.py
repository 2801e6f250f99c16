"""The continual-development report: reads a store's records and draws what each method extension and
mutation action contributed. torch-free; ``launch/report_cmd.py`` is its entry point.

``build.build_report(store) -> dict`` (plain JSON values), ``html.render_html(report) -> str``.
"""
