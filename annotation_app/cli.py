"""rlhf annotate: serve the app, manage users, import candidates, export rankings, print stats.

A round end to end::

    rlhf annotate users add alice --role admin --db lab.db        # asks for a password
    rlhf annotate import runs/x/generate/candidates.jsonl --db lab.db \\
        --project_config experiments/configs/annotation_project.yaml
    rlhf annotate serve --db lab.db                               # http://127.0.0.1:7860
    rlhf annotate stats --db lab.db
    rlhf annotate prioritize --db lab.db --reward runs/x/rm_train/model   # least certain first
    rlhf annotate export --db lab.db --format pairs --out prefs   # HF dataset dir (or .jsonl)

``--db`` is a SQLite file, or a PostgreSQL URL (``postgresql://user@host:5432/lab``; the database
must exist, the tables are created on first use), which several ``serve`` processes can share.
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import sys
from pathlib import Path

from annotation_app.agreement import agreement_report
from annotation_app.control import ranking_from_scores
from annotation_app.dashboard import BOOTSTRAP_RESAMPLES
from annotation_app.database import is_url
from annotation_app.gold import gold_accuracy, gold_accuracy_text
from annotation_app.io import export_rankings, import_candidates, load_project_config
from annotation_app.store import DEFAULT_PROJECT, ROLES, Store, StoreError
from rlhf.active import MEASURES, least_certain_first, uncertainty
from rlhf.errors import require_extra
from rlhf.export import EXPORT_FORMATS, TRL_STYLES
from rlhf.rewards import load_reward_fn, score_candidates


def _open(db: str, create: bool = False) -> Store:
    """The store at ``db``; a SQLite file must exist unless ``create`` (a URL is checked by connecting)."""
    if not create and not is_url(db) and not Path(db).is_file():
        raise StoreError(
            f"database {db!r} does not exist; create it with `rlhf annotate users add NAME --db {db}` "
            "or `rlhf annotate import FILE --db ...`",
            code="missing_db",
        )
    return Store(db)


def _read_password(username: str) -> str:
    # A TTY gets a hidden prompt (twice); otherwise the first line of stdin (scripts, CI).
    if sys.stdin.isatty():
        first = getpass.getpass(f"password for {username}: ")
        second = getpass.getpass("again: ")
        if first != second:
            raise StoreError("the two passwords differ; nothing changed", code="password_mismatch")
        return first
    line = sys.stdin.readline()
    return line.rstrip("\r\n")


def _users_add(args) -> int:
    store = _open(args.db, create=True)
    store.add_user(args.name, _read_password(args.name), args.role, replace=args.replace)
    print(f"user {args.name!r} ({args.role}) saved in {store.db.name}")
    return 0


def _users_list(args) -> int:
    for u in _open(args.db).users():
        print(f"{u['username']}\t{u['role']}")
    return 0


def _import(args) -> int:
    cfg = load_project_config(args.project_config) if args.project_config else {}
    project = args.project or cfg.get("project") or DEFAULT_PROJECT
    quorum = args.quorum if args.quorum is not None else cfg.get("quorum")
    lease = int(args.lease_minutes * 60) if args.lease_minutes is not None else cfg.get("lease_seconds")
    gold_rate = args.gold_rate if args.gold_rate is not None else cfg.get("gold_rate")
    guidelines = cfg.get("guidelines")
    if args.guidelines:
        path = Path(args.guidelines)
        if not path.is_file():
            raise StoreError(f"guidelines file {args.guidelines!r} does not exist", code="missing_file")
        guidelines = path.read_text(encoding="utf-8")
    res = import_candidates(
        _open(args.db, create=True),
        args.file,
        project=project,
        quorum=quorum,
        guidelines=guidelines,
        lease_seconds=lease,
        gold_rate=gold_rate,
        max_chars=args.max_chars,
        correct_gold=args.correct_gold,
    )
    corrected = f", {res['gold_corrected']} gold answers corrected" if args.correct_gold else ""
    print(
        f"{args.file}: {res['rows']} rows, {res['added']} new prompts, {res['unchanged']} already imported"
        f"{corrected} (project {project!r})"
    )
    return 0


def _export(args) -> int:
    res = export_rankings(
        _open(args.db),
        args.out,
        fmt=args.format,
        project=args.project,
        trl_style=args.trl_style,
        model=args.model,
        # all projects: the ranking items; a named project: its rankings, or its arena votes
        kind="ranking" if args.project is None else None,
    )
    print(f"wrote {res['records']} {res['format']} records ({res['rankings']} rankings) to {res['out']}")
    if "ties_out" in res:
        print(f"wrote {res['ties']} tied pairs (not preferences: TRL must not see them) to {res['ties_out']}")
    return 0


def _propose(args) -> int:
    """Score every prompt's responses with a reward model or scorer and store its ranking as the
    prompt's proposal (admins compare it with the annotators' on the dashboard)."""
    store = _open(args.db)
    prompts = store.prompts_for_proposal(args.project)
    if not prompts:
        raise StoreError(f"{args.db} has no prompts to propose rankings for", code="empty")
    reward = load_reward_fn(args.reward)  # checks the spec, and loads a model, before any scoring
    proposals = {
        item["prompt_id"]: ranking_from_scores(
            [c["label"] for c in item["candidates"]], scores, args.tie_threshold
        )
        for item, scores in zip(prompts, score_candidates(reward, prompts, progress="propose: scoring"))
    }
    n = store.set_proposals(proposals, source=f"{reward.name} (tie_threshold {args.tie_threshold:g})")
    print(
        f"stored {n} proposed rankings from {reward.name} in {store.db.name}; "
        "only annotators who opt in see them"
    )
    return 0


def _prioritize(args) -> int:
    """Active selection: serve first the prompts a reward model is least certain how to rank."""
    store = _open(args.db)
    prompts = store.prompts_for_proposal(args.project)
    if not prompts:
        raise StoreError(f"{args.db} has no prompts to prioritise", code="empty")
    reward = load_reward_fn(args.reward)  # checks the spec, and loads a model, before any scoring
    order = least_certain_first(uncertainty(prompts, reward, args.by))
    n = store.set_serve_order(order, source=f"{reward.name} ({args.by})", project=args.project)
    print(
        f"{store.db.name}: {n} prompts now served least certain first by {reward.name} ({args.by}); "
        f"first: {', '.join(order[:5])}. Rerun after training on the new rankings."
    )
    return 0


def _stats(args) -> int:
    store = _open(args.db)
    stats = store.stats()
    rankings = store.submitted_rankings(args.project, kind="ranking")
    report = agreement_report(rankings)
    # accuracy on the items with a known answer, as the admin dashboard shows it
    gold = store.gold_answers(args.project)
    on_gold = gold_accuracy(rankings, gold, resamples=BOOTSTRAP_RESAMPLES) if gold else {}
    if args.json:

        def clean(v):
            return None if isinstance(v, float) and math.isnan(v) else v

        out = {**{k: v for k, v in stats.items()}, "agreement": {k: clean(v) for k, v in report.items()}}
        out["median_seconds_per_item"] = clean(out["median_seconds_per_item"])
        for user in out["annotators"]:
            acc = on_gold.get(user["username"])
            if acc is not None:
                interval = acc.pair_accuracy.as_dict("pair_accuracy")
                user["gold"] = {
                    "items": acc.items,
                    "pairs": acc.pairs,
                    **{key: clean(value) for key, value in interval.items()},
                    "all_right": acc.all_right,
                }
        print(json.dumps(out, indent=2))
        return 0

    def num(v, fmt: str = ".3f") -> str:
        # NaN means "not defined yet" (no rankings, no prompt with two annotators, ...)
        return "- (not enough rankings yet)" if isinstance(v, float) and math.isnan(v) else format(v, fmt)

    n_gold = sum(1 for p in stats["prompts"] if p["gold"] is not None)
    n_prompts = len(stats["prompts"]) - n_gold
    print(
        f"prompts: {n_prompts}" + (f" (and {n_gold} gold items)" if n_gold else "") + ", "
        f"complete (quorum reached): {stats['complete_prompts']}, "
        f"submitted rankings: {stats['submitted']}, median seconds per item: "
        f"{num(stats['median_seconds_per_item'], '.1f')}"
    )
    print(
        "annotator\trole\tsubmitted\tskipped\tdrafts\tmean_s"
        + ("\tgold_items\tgold_pair_accuracy" if gold else "")
    )
    for u in stats["annotators"]:
        mean = "-" if u["mean_seconds"] is None else f"{u['mean_seconds']:.1f}"
        row = f"{u['username']}\t{u['role']}\t{u['submitted'] or 0}\t{u['skipped'] or 0}\t{u['drafts'] or 0}\t{mean}"
        if gold:
            acc = on_gold.get(u["username"])
            row += f"\t{acc.items}\t{gold_accuracy_text(acc)}" if acc else "\t0\t-"
        print(row)
    print("agreement:")
    for key, value in report.items():
        print(f"  {key}: {num(value)}" if isinstance(value, float) else f"  {key}: {value}")
    return 0


def _serve(args) -> int:
    require_extra("gradio", "app", "the annotation app")
    from annotation_app.server import serve  # lazy: Gradio is the optional app extra, and slow to import

    _open(args.db).close()  # a missing file or an unreachable server: one line, before Gradio starts
    serve(
        args.db,
        host=args.host,
        port=args.port,
        project=args.project,
        block=True,
        session_hours=args.session_hours,
    )
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "annotate",
        help="the annotation app: serve, users, import, export, stats",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="annotate_command", metavar="ACTION", required=True)

    def db_arg(p):
        p.add_argument(
            "--db",
            default="annotations.db",
            help="SQLite database file, or a PostgreSQL URL such as postgresql://user@host:5432/dbname "
            "(one database for several app processes) (default: annotations.db)",
        )

    p = sub.add_parser(
        "serve",
        help="open the annotation page (login required)",
        description="Serve the annotation page and the /next, /submit, /skip API endpoints.",
    )
    db_arg(p)
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it to the network)",
    )
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--project", default=None, help="only serve prompts of this project (default: all)")
    p.add_argument(
        "--session_hours",
        type=float,
        default=12.0,
        help="a login lasts this long; then the user logs in again (default 12)",
    )
    p.set_defaults(func=_serve)

    users = sub.add_parser(
        "users",
        help="manage annotator and admin accounts",
        description="Add annotator and admin accounts, or list them.",
    )
    usub = users.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    p = usub.add_parser(
        "add",
        help="add a user (password from a prompt, or the first line of stdin)",
        description="Add a user. The password is asked twice on a terminal, or read from the "
        "first line of stdin otherwise (at least 8 characters).",
    )
    p.add_argument("name", help="user name (letters, digits, . _ - @)")
    p.add_argument("--role", choices=ROLES, default="annotator", help="annotator (default) or admin")
    p.add_argument("--replace", action="store_true", help="reset the password/role of an existing user")
    db_arg(p)
    p.set_defaults(func=_users_add)
    p = usub.add_parser("list", help="list users and roles", description="List every user and their role.")
    db_arg(p)
    p.set_defaults(func=_users_list)

    p = sub.add_parser(
        "import",
        help="import candidates (e.g. the output of `rlhf generate`); idempotent",
        description="Import a candidates file (JSONL/JSON/parquet/dataset dir). Every bad row is "
        "reported with its number and nothing is imported then; importing the same "
        "file again adds nothing.",
    )
    p.add_argument("file", help="candidates file: prompt_id, prompt, candidates [{label, text, model, gen}]")
    db_arg(p)
    p.add_argument(
        "--project_config",
        default=None,
        help="project YAML (project, quorum, lease_minutes, guidelines or guidelines_file, gold_rate), "
        "e.g. experiments/configs/annotation_project.yaml",
    )
    p.add_argument(
        "--project", default=None, help=f"project name (default: from the config, else {DEFAULT_PROJECT!r})"
    )
    p.add_argument("--quorum", type=int, default=None, help="rankings needed per prompt (default 3)")
    p.add_argument(
        "--lease_minutes", type=float, default=None, help="minutes an annotator holds a prompt (default 30)"
    )
    p.add_argument("--guidelines", default=None, help="Markdown file with the annotation guidelines")
    p.add_argument(
        "--gold_rate",
        type=float,
        default=None,
        help="share (0 to 1) of each annotator's items drawn, unannounced, from the project's gold items: "
        "records with a `gold` answer such as 'B > A = C' (default: from the config, else 0)",
    )
    p.add_argument("--max_chars", type=int, default=20_000, help="longest response accepted, in characters")
    p.add_argument(
        "--correct_gold",
        action="store_true",
        help="let this file change the answer of gold items already imported (same prompt and responses, "
        "a corrected `gold`); each change is audited, and accuracy on gold is then judged against the "
        "new answer, for rankings already made too. Without it a changed answer is a conflict",
    )
    p.set_defaults(func=_import)

    p = sub.add_parser(
        "export",
        help="export submitted rankings, derived pairs or TRL's preference format",
        description="Export submitted rankings (the rankings contract), derived pairs (ties kept as "
        "tie=true rows, for pair losses that model ties) or trl (strict pairs only, for TRL's "
        "RewardTrainer/DPOTrainer; the tied pairs go to OUT_STEM.ties.jsonl beside it), as "
        "`rlhf export` writes them. OUT ending in .jsonl writes JSONL, .parquet parquet, any "
        "other path an HF dataset folder.",
    )
    db_arg(p)
    p.add_argument("--format", choices=EXPORT_FORMATS, default="rankings", help="what to export")
    p.add_argument(
        "--trl_style",
        choices=TRL_STYLES,
        default="conversational",
        help="format trl: chat messages (conversational, default) or strings with --model's chat "
        "template applied (standard)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="format trl, style standard: the model whose chat template the responses were sampled under",
    )
    p.add_argument("--out", required=True, help="output: FILE.jsonl, FILE.parquet or a dataset folder")
    p.add_argument("--project", default=None, help="only this project (default: all)")
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "propose",
        help="pre-annotate: a reward model or scorer proposes a ranking of every prompt (hidden unless opted in)",
        description="Score every prompt's responses with --reward (a reward-model dir, or a scorer such as "
        "vader or length:target=50) and store the resulting ranking as the prompt's proposal, replacing "
        "earlier ones. Annotators see it only if they opt in (a box on the Annotate tab); the admin "
        "dashboard reports its agreement with the annotators (Cohen's kappa on win/tie/loss per response "
        "pair, Kendall tau-b), overall and per prompt, and apart for rankings made with and without it "
        "shown, so a team can tell when a model is good enough to pre-rank.",
    )
    db_arg(p)
    p.add_argument("--reward", required=True, help="reward-model dir or scorer spec (as rlhf ppo's reward)")
    p.add_argument(
        "--tie_threshold",
        type=float,
        default=0.0,
        help="responses whose scores are within this of their tier's best are proposed as a tie (default 0)",
    )
    p.add_argument("--project", default=None, help="only this project (default: all)")
    p.set_defaults(func=_propose)

    p = sub.add_parser(
        "prioritize",
        help="active selection: serve first the prompts a reward model is least certain how to rank",
        description="Score every prompt's responses with --reward and serve the prompts it is least "
        "certain about first, among prompts with equally many rankings (rlhf/active.py): --by margin, "
        "the closest two responses' scores; --by ensemble, how much the members of a reward-model "
        "ensemble (rlhf rm train --ensemble N) disagree. Rerun it after training on the new rankings; "
        "experiments/benchmarks/bench_active_selection.py measures what it buys.",
    )
    db_arg(p)
    p.add_argument("--reward", required=True, help="reward-model dir, ensemble dir or scorer spec")
    p.add_argument("--by", choices=MEASURES, default="margin", help="uncertainty measure (default margin)")
    p.add_argument("--project", default=None, help="only this project (default: all)")
    p.set_defaults(func=_prioritize)

    p = sub.add_parser(
        "stats",
        help="progress per annotator and prompt, agreement, tie rate, time per item, accuracy on gold items",
        description="Print the progress per annotator and prompt, the agreement between annotators, "
        "the tie rate, the time per item and, when the project has gold items, each annotator's "
        "accuracy on them (pairs of the known answer ranked the same way, with a 95 % interval over items).",
    )
    db_arg(p)
    p.add_argument("--project", default=None, help="agreement over this project only (default: all)")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.set_defaults(func=_stats)

    return parser
