"""The two datasets of immunization, by the names every layer uses."""

#: D_P (the pre-training task, which must stay easy) and D_H (the harmful task, made hard).
SIDES: tuple[str, str] = ("pretrain", "harmful")
#: The same two in display order: every probing table and figure leads with the harmful task.
DISPLAY_SIDES: tuple[str, str] = ("harmful", "pretrain")
