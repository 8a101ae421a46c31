"""Balance-aware turns (issue 14): the per-user and per-model switch. The reserve and settle that
honour it are migration 0006's ``billing_reserve_aware`` and ``billing_settle_within``."""
