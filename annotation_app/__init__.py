"""annotation_app package: the annotation app.

``store`` (SQLite: users, leases, rankings, audit log), ``agreement`` (τ-b, Krippendorff's α,
win/tie/loss agreement), ``io`` (import candidates, export rankings/pairs), ``control`` and
``text`` (the page's pure logic), ``app`` (Gradio wiring), ``cli`` (``rlhf annotate``),
``simulated_client`` (scripted annotators over the named API).
"""
