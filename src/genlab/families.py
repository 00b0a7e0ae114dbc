"""The families' names, in the order the report lists them. Importing this module is cheap (the
CLI's choices and the params schema need the names, not the code): `genlab.models.MODELS` maps
each name to its class, one explicit line per family, and a test checks that the two agree."""

FAMILIES = ("pixelcnn", "flow", "vae", "diffusion", "flow_matching", "ebm", "gan")
