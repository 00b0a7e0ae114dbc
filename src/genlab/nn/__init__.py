"""Network blocks shared *identically* by two or more families (DESIGN.md, layout)."""
