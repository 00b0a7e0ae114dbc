"""One thin module per DVC stage: take params, call the library, write the declared outputs."""
