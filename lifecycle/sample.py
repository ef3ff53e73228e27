"""The bundled sample: support tickets, generated deterministically at any size.

Each ticket's text is drawn from its category's vocabulary (plus shared filler words), so a text
query about "refund" finds billing tickets and a model can learn the category from the numeric and
categorical features too. The same generator feeds the demo, the tests and the benchmarks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

CATEGORIES: dict[str, list[str]] = {
    "billing": ["invoice", "refund", "charge", "payment", "credit card", "billing cycle", "overcharged", "receipt"],
    "technical": ["error", "crash", "bug", "timeout", "stack trace", "server down", "exception", "latency"],
    "account": ["password", "login", "two-factor", "username", "locked out", "profile", "email change", "sign in"],
    "shipping": ["delivery", "package", "tracking number", "courier", "delayed", "shipment", "address", "parcel"],
}
FILLER = ["please", "help", "today", "urgent", "hello", "thanks", "again", "issue", "since", "yesterday", "my", "the"]
CHANNELS = ["email", "chat", "phone", "web"]
PLANS = ["free", "pro", "enterprise"]


def generate_tickets(rows: int, seed: int = 7) -> pd.DataFrame:
    """Generate `rows` support tickets; the same (rows, seed) always gives the same frame.

    Columns: ticket_id (unique int), text, channel, plan (categoricals), account_age_days,
    prior_tickets, response_minutes, sentiment (numeric), category (the label, 4 classes).
    """
    rng = np.random.default_rng(seed)
    names = list(CATEGORIES)
    label_idx = rng.integers(0, len(names), size=rows)
    texts = []
    for i in label_idx:
        vocab = CATEGORIES[names[i]]
        words = list(rng.choice(vocab, size=3)) + list(rng.choice(FILLER, size=3))
        rng.shuffle(words)
        texts.append(" ".join(words))
    # Numeric and categorical features carry a category signal (noisy, so the model has work to do)
    # and the text carries a clean one, so both the tabular model and the search have something real.
    channel_p = np.array([[0.55, 0.15, 0.2, 0.1], [0.15, 0.55, 0.1, 0.2], [0.2, 0.1, 0.15, 0.55],
                          [0.1, 0.2, 0.55, 0.15]])
    plan_p = np.array([[0.1, 0.5, 0.4], [0.3, 0.3, 0.4], [0.6, 0.3, 0.1], [0.34, 0.33, 0.33]])
    u1, u2 = rng.random(rows), rng.random(rows)
    channel = np.array(CHANNELS, dtype=object)[(u1[:, None] > channel_p[label_idx].cumsum(axis=1)).sum(axis=1)]
    plan = np.array(PLANS, dtype=object)[(u2[:, None] > plan_p[label_idx].cumsum(axis=1)).sum(axis=1)]
    shift = label_idx.astype(float)
    frame = pd.DataFrame(
        {
            "ticket_id": np.arange(1, rows + 1, dtype=np.int64),
            "text": texts,
            "channel": channel,
            "plan": plan,
            "account_age_days": np.round(rng.gamma(2.0, 150.0, size=rows) + 400 * (label_idx == 2), 1),
            "prior_tickets": rng.poisson(0.5 + 1.5 * shift, size=rows).astype(np.int64),
            "response_minutes": np.round(rng.exponential(20.0, size=rows) * (1 + 2.0 * (label_idx == 1)), 2),
            "sentiment": np.round(np.clip(rng.normal(0.5 - 0.3 * shift, 0.3, size=rows), -1, 1), 3),
            "category": np.array(names, dtype=object)[label_idx],
        }
    )
    return frame


SAMPLE_SPEC = {
    "name": "tickets",
    "id_column": "ticket_id",
    "label_column": "category",
    "task": "multiclass",
    "numeric_features": ["account_age_days", "prior_tickets", "response_minutes", "sentiment"],
    "categorical_features": ["channel", "plan"],
    "text_column": "text",
    "expectations": {
        "min_rows": 100,
        "ranges": {"sentiment": {"min": -1, "max": 1}, "account_age_days": {"min": 0}, "prior_tickets": {"min": 0}},
        "allowed_labels": list(CATEGORIES),
    },
}


def write_sample(directory: str | Path, rows: int = 5000, seed: int = 7) -> tuple[Path, Path]:
    """Write the sample CSV and its spec into a folder; returns (csv path, spec path)."""
    import yaml

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    csv_path = directory / "tickets.csv"
    generate_tickets(rows, seed).to_csv(csv_path, index=False)
    spec_path = directory / "tickets.yaml"
    spec_path.write_text(yaml.safe_dump({**SAMPLE_SPEC, "source": csv_path.name}, sort_keys=False))
    return csv_path, spec_path
