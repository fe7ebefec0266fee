"""annotation_app package: the annotation app.

``store`` (SQLite: users, prompts, leases, rankings, audit log; its read-only ``queries``, the
``schema`` and migrations, ``auth`` for passwords, login throttling and the session user,
``validation`` of client input, the ``records`` it returns, ``errors``), ``agreement`` (τ-b,
Krippendorff's α, win/tie/loss agreement), ``io`` (import candidates, export rankings/pairs),
``control`` and ``text`` (the page's pure logic), ``handlers`` (what each page control and API
endpoint does, without Gradio), ``app`` (Gradio layout and wiring), ``cli`` (``rlhf annotate``),
``simulated_client`` (scripted annotators over the named API).
"""
