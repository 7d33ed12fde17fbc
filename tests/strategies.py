"""Hypothesis strategies for any value of the declared message catalog,
derived from the declarations like the codecs are, and for the well-formed
requests of section 7."""

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


def values(spec: M.FieldSpec):
    """A strategy for any value of one declared field (or list item)."""
    if spec.kind == "struct":
        return instances(spec.struct)
    if spec.kind == "list":
        return st.lists(values(spec.item), max_size=3)
    return SCALARS[spec.kind]


def instances(cls):
    """A strategy for any value of a declared message or struct class."""
    return st.builds(cls, **{spec.name: values(spec) for spec in M.field_specs(cls)})


ANY_MESSAGE = st.one_of([instances(cls) for cls in M.MESSAGES.values()])
CLIENT_MESSAGE = st.one_of([instances(M.MESSAGES[t]) for t in sorted(M.CLIENT_REQUESTS)])
SECTION_7_CLASSES = [M.MESSAGES[t] for t in sorted(M.PROTOCOL_1_1_TYPES)]

# --- well-formed section 7 requests ------------------------------------------------

_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"
USER_IDS = st.text(_ID_CHARS, min_size=1, max_size=64)
GROUP_IDS = st.text(_ID_CHARS, min_size=1, max_size=63).map(lambda s: "#" + s)
PEERS = st.one_of(USER_IDS, GROUP_IDS)
CMIDS = st.binary(min_size=1, max_size=32)
# Any text of at most 256 bytes without control or bidi-control characters.
TITLES = st.text(
    st.characters(blacklist_categories=("Cc", "Cs"),
                  blacklist_characters="\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"),
    max_size=64,
).filter(lambda s: len(s.encode()) <= 256)
_USER_LISTS = st.lists(USER_IDS, max_size=8)

VALID_1_1_REQUEST = st.one_of(
    st.builds(M.GroupCreate, group=GROUP_IDS, title=TITLES, members=_USER_LISTS),
    st.builds(M.GroupAdd, group=GROUP_IDS, users=_USER_LISTS, cmid=CMIDS),
    st.builds(M.GroupRemove, group=GROUP_IDS, users=_USER_LISTS, cmid=CMIDS),
    st.builds(M.GroupGet, group=GROUP_IDS),
    st.builds(M.GroupTitle, group=GROUP_IDS, title=TITLES, cmid=CMIDS),
    st.builds(M.Watch, users=st.lists(PEERS, max_size=8)),
    st.builds(M.SetPresence, state=st.sampled_from([1, 2, 3])),
    st.builds(M.Typing, peer=PEERS, typing=st.booleans()),
    st.builds(M.Send, to=GROUP_IDS, cmid=CMIDS, kind=st.integers(0, 249), body=st.binary(max_size=40)),
    st.builds(M.Read, peer=GROUP_IDS, msg_id=st.integers(0, 2**53 - 1)),
)
