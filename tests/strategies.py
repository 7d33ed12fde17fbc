"""Hypothesis strategies for any value of the declared message catalog,
derived from the declarations like the codecs are."""

from hypothesis import strategies as st

from simzmq.wire import messages as M

TEXT = st.one_of(st.text(max_size=24), st.sampled_from(["", "alice", "bob", "#g", "a" * 64, "a" * 65, "é"]))

SCALARS = {
    "u8": st.integers(0, 2**8 - 1),
    "u16": st.integers(0, 2**16 - 1),
    "u32": st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**32 - 1])),
    "u64": st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**53 - 1, 2**53, 2**64 - 1])),
    "str": TEXT,
    "bytes": st.binary(max_size=40),
    "bool": st.booleans(),
}


def instances(cls):
    """A strategy for any value of a declared message or struct class."""
    fields = {}
    for spec in M.field_specs(cls):
        if spec.kind == "struct":
            fields[spec.name] = instances(spec.struct)
        elif spec.kind == "list":
            fields[spec.name] = st.lists(instances(spec.struct), max_size=3)
        else:
            fields[spec.name] = SCALARS[spec.kind]
    return st.builds(cls, **fields)


ANY_MESSAGE = st.one_of([instances(cls) for cls in M.MESSAGES.values()])
CLIENT_MESSAGE = st.one_of([instances(M.MESSAGES[t]) for t in sorted(M.CLIENT_REQUESTS)])
