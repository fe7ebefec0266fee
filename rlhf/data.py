"""The lab's data, by the name user code and earlier stages import it from.

The code lives in three rooms, each with one job:

- :mod:`rlhf.datafiles`: reading and writing record files (JSON Lines, JSON, Parquet, datasets),
  every bad row with its line number, atomic writes;
- :mod:`rlhf.contracts`: what each record kind must contain (docs/architecture.md, "Data
  contracts"), the validating loaders, and the one prompt → text rule;
- :mod:`rlhf.export`: derived pairs, TRL's preference and KTO formats, and ``rlhf export``.

Every name below stays importable from ``rlhf.data``, as before the split.
"""

from rlhf.contracts import (  # noqa: F401
    CHAT_ROLES,
    Problems,
    content_text,
    load_candidates,
    load_demonstrations,
    load_pairs,
    load_prompts,
    load_rankings,
    prompt_text,
    validate_candidates,
    validate_demonstration,
    validate_pair,
    validate_prompt,
    validate_ranking,
)
from rlhf.datafiles import (  # noqa: F401
    LAB_SOURCES,
    MAX_LINE_BYTES,
    MAX_LISTED,
    DataError,
    RowError,
    output_kind,
    read_jsonl,
    read_source,
    save_records,
    type_name,
    write_jsonl,
)
from rlhf.datafiles import read_source as _read_source  # noqa: F401  (its name before the split)
from rlhf.export import (  # noqa: F401
    EXPORT_FORMATS,
    TRL_STYLES,
    Export,
    ExportConfig,
    add_parser,
    build_export,
    check_export_options,
    export_stats,
    exported_rankings_types,
    kto_label,
    prompt_messages,
    ranking_for_export,
    ranking_of,
    rankings_to_kto,
    rankings_to_pairs,
    rankings_to_trl,
    run_export,
    ties_path,
    write_export,
)
