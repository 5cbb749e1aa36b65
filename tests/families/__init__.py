"""Small families of the tests' own, registered by module path (``model.family=tests.families.NAME``):
what a user's family outside fmtrain looks like, and the engine features no built-in family uses
yet (a plain conv net, two optimizers, a frozen copy)."""
