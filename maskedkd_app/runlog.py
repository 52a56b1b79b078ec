"""A run's ``log.txt``: one JSON object per epoch, read back the same way by the plots, the demo and the
reproduction (a line cut short by a kill or a full disk is skipped, not an error)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List


def read_log(log: Path) -> List[Dict]:
    """The epoch records of ``log`` in file order; [] when there is no log yet."""
    if not Path(log).is_file():
        return []
    records = []
    for text in Path(log).read_text().splitlines():
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
