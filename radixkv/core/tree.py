"""Radix tree over token ids whose edges are runs of whole blocks. Integers only, no tensors."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple

from sortedcontainers import SortedList

from .hashing import root_hash
from .policy import EvictionPolicy


class Group:
    """An eviction group: one tenant with a share, or every tenant without one.

    `share`: blocks guaranteed (None: no guarantee, the cache without shares). `blocks`: blocks
    of the group's tenants in the tree, locked ones included. `evictable`: its unlocked leaves
    as (key, uid), smallest key evicted first.
    """

    __slots__ = ("share", "blocks", "evictable")

    def __init__(self, share: int | None) -> None:
        self.share = share
        self.blocks = 0
        self.evictable: SortedList = SortedList()

    @property
    def over(self) -> int:
        """Blocks above the share (0 when within it or without one)."""
        return 0 if self.share is None else max(0, self.blocks - self.share)


class Tenant:
    """Whose blocks a namespace's nodes are: the counters of one tenant and its eviction group.

    `blocks`: its blocks in the tree; `query_tokens` and `hit_tokens`: its lookups' totals.
    """

    __slots__ = ("key", "name", "group", "blocks", "query_tokens", "hit_tokens")

    def __init__(self, key: bytes, name: object, group: Group) -> None:
        self.key = key
        self.name = name
        self.group = group
        self.blocks = 0
        self.query_tokens = 0
        self.hit_tokens = 0


class Node:
    """One edge of the tree: `len(block_ids)` whole blocks of tokens after its parent's path.

    `tokens` holds `len(block_ids) * block_size` ids. A namespace root has no blocks and no
    parent. `lock_ref` counts live matches and in-flight inserts and promotions whose path
    includes the node (on a root: its pins). `owner` is the tenant of the node's namespace
    (shared with its root).
    """

    __slots__ = (
        "uid", "parent", "children", "tokens", "block_ids", "block_hashes", "lock_ref",
        "last_access", "created", "hits", "priority", "evict_key", "detached",
        "ns_key", "root_hash", "policy_state", "owner",
    )  # fmt: skip

    def __init__(self, uid: int, parent: Node | None, now: int) -> None:
        self.uid = uid
        self.parent = parent
        self.children: dict[tuple[int, ...], Node] = {}
        self.tokens: list[int] = []
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []
        self.lock_ref = 0
        self.last_access = now
        self.created = now
        self.hits = 0
        self.priority = 0
        self.evict_key: object | None = None  # set while the node is in the evictable list
        self.detached = False
        self.ns_key: bytes = b""
        self.root_hash = 0
        self.policy_state: object = None  # owned by the eviction policy
        self.owner: Tenant = parent.owner if parent is not None else None  # type: ignore[assignment]

    @property
    def last_hash(self) -> int:
        """Hash of the node's last block, the seed for its children's chain."""
        return self.block_hashes[-1] if self.block_hashes else self.root_hash

    def __repr__(self) -> str:
        return f"Node(uid={self.uid}, blocks={len(self.block_ids)}, lock_ref={self.lock_ref})"


class Found(NamedTuple):
    """A lookup's result: the deepest matched node (None: nothing matched) and its path's blocks."""

    node: Node | None
    block_ids: list[int]
    block_hashes: list[int]


class Hold(NamedTuple):
    """A pinned namespace root and a locked path to `node`, `matched` blocks deep (see `hold`)."""

    root: Node
    node: Node
    matched: int


class RadixTree:
    """Per-namespace radix trees, locks, and the ordered set of evictable leaves.

    Contract: `descend` finds the longest whole-block prefix and splits the node it ends in,
    so a path always ends at a node boundary. `acquire`/`release` lock and unlock a path (root
    excluded); locked nodes are never evictable. `pin`/`unpin` keep a namespace root (and so
    the namespace) alive while nothing is under it yet. The facade's three uses of a path:
    `lookup` (a match: ticks the clock, locks the path as a hit, lists its blocks), `hold` /
    `unhold` (an insert or promotion: pin, descend, lock without a hit; an insert ticks) and
    `peek` (where a lower tier continues: no lock, no tick). `evict` removes tail blocks of the
    smallest-keyed unlocked leaf until enough blocks are gone and returns their ids; a parent
    becomes evictable when its last child goes. `check` asserts the structure, `check_locks`
    that every lock count is explained by the holders the caller names.
    Costs: descend, lookup, hold and peek O(depth + matched tokens) in C with O(depth) Python
    steps (lookup adds O(matched blocks) to list them); acquire/release O(depth); each
    evictable-set update O(log leaves); check O(nodes + blocks + evictable leaves);
    check_locks O(nodes + total held path length).
    Not thread-safe on its own: the cache serialises calls.

    Shares (`shares`: tenant key -> guaranteed blocks; the tenants not listed share `rest`
    blocks): each listed tenant's leaves form a group of their own, the others one more group.
    An eviction takes the smallest-keyed leaf of the groups above their share (never more than
    the excess), and only then, for an insert, the inserting tenant's own group; a group within
    its share loses blocks to no one else's insert. O(groups + log leaves) per leaf. Without
    shares there is one group and the order is the policy's alone.
    """

    def __init__(
        self,
        block_size: int,
        policy: EvictionPolicy,
        shares: Mapping[bytes, int] | None = None,
        rest: int | None = None,
    ) -> None:
        self.block_size = block_size
        self.policy = policy
        self.roots: dict[bytes, Node] = {}
        self._share_groups = {key: Group(blocks) for key, blocks in (shares or {}).items()}
        self._rest = Group(rest if shares else None)
        self.groups: list[Group] = [*self._share_groups.values(), self._rest]
        self.tenants: dict[bytes, Tenant] = {}
        self._ns_owner: dict[bytes, Tenant] = {}  # namespace key -> its tenant
        self._evictable_nodes: dict[int, Node] = {}
        self._clock = 0
        self._generation = policy.generation  # the policy's order the keys in _evictable follow
        self._next_uid = 1
        self.num_blocks = 0  # blocks referenced by the tree
        self.num_locked_blocks = 0  # blocks of nodes with lock_ref > 0, detached ones included
        self.num_nodes = 0  # non-root nodes
        # Called as on_evict(node, first) before blocks [first:] of `node` leave by eviction,
        # while their KV is still in the pool (the lower tiers copy it out). None: no tiers.
        self.on_evict: Callable[[Node, int], None] | None = None

    # ----- nodes and namespace roots -----------------------------------------------------
    def _new_node(self, parent: Node | None) -> Node:
        node = Node(self._next_uid, parent, self._clock)
        self._next_uid += 1
        return node

    def tenant(self, key: bytes, name: object, ns_key: bytes | None = None) -> Tenant:
        """The tenant record of `key` (created on first use; `name` is what stats show), noted
        as the owner of namespace `ns_key` when given."""
        t = self.tenants.get(key)
        if t is None:
            t = self.tenants[key] = Tenant(key, name, self._share_groups.get(key, self._rest))
        if ns_key is not None:
            self._ns_owner[ns_key] = t
        return t

    def owner_of(self, ns_key: bytes) -> Tenant:
        """The tenant that owns namespace `ns_key` (the namespace itself if none was noted)."""
        t = self._ns_owner.get(ns_key)
        return t if t is not None else self.tenant(ns_key, None, ns_key)

    def find_root(self, ns_key: bytes) -> Node | None:
        """The root of namespace `ns_key`, or None when the tree holds nothing of it."""
        return self.roots.get(ns_key)

    def pin(self, ns_key: bytes, owner: Tenant | None = None) -> Node:
        """The root of namespace `ns_key` (created when missing, owned by `owner`, default the
        namespace's noted owner), pinned: no eviction forgets the namespace until `unpin`."""
        root = self.roots.get(ns_key)
        if root is None:
            root = self._new_node(None)
            root.ns_key = ns_key
            root.root_hash = root_hash(ns_key)
            root.owner = owner if owner is not None else self.owner_of(ns_key)
            self.roots[ns_key] = root
        root.lock_ref += 1  # a root's lock_ref counts pins; roots are never on a locked path
        return root

    def unpin(self, root: Node) -> None:
        """Undo one `pin`; the namespace is forgotten when nothing is left under it."""
        root.lock_ref -= 1
        self._drop_root_if_empty(root)

    def _drop_root_if_empty(self, root: Node) -> None:
        if not root.children and root.lock_ref == 0 and self.roots.get(root.ns_key) is root:
            del self.roots[root.ns_key]

    def hold(
        self, ns_key: bytes, ids: list[int], max_blocks: int, owner: Tenant | None = None,
        priority: int | None = None, tick: bool = False,
    ) -> Hold:  # fmt: skip
        """Pin namespace `ns_key`, find its longest whole-block prefix of `ids` (at most
        `max_blocks`) and lock the path to it without counting a hit, so that evictions cannot
        remove the node a new run is attached under. `tick`: advance the clock first (an insert
        is a use of its own; a promotion belongs to the lookup that follows it). Pair with
        `unhold`. O(depth + matched tokens), as `descend`."""
        if tick:
            self._clock += 1
        root = self.pin(ns_key, owner)
        node, matched = self.descend(root, ids, max_blocks)
        self.acquire(node, hit=False, priority=priority)
        return Hold(root, node, matched)

    def unhold(self, held: Hold) -> list[int]:
        """Undo `hold`; returns blocks no one holds now (detached by a `clear` meanwhile)."""
        freed = self.release(held.node)
        self.unpin(held.root)
        return freed

    # ----- lookup ----------------------------------------------------------------------
    def lookup(self, ns_key: bytes, ids: list[int], max_blocks: int) -> Found:
        """A match: advance the clock, find the longest whole-block prefix of `ids` (at most
        `max_blocks`) in namespace `ns_key` and lock it as a hit (`release(found.node)` unlocks).
        `node` is None when nothing matched (nothing locked then). O(depth + matched tokens)
        plus O(matched blocks) to list the path's blocks."""
        self._clock += 1
        root = self.roots.get(ns_key)
        if root is not None:
            node, matched = self.descend(root, ids, max_blocks)
            if matched:
                self.acquire(node, hit=True)
                block_ids, hashes = self.blocks_along(node)
                return Found(node, block_ids, hashes)
        return Found(None, [], [])

    def peek(self, ns_key: bytes, ids: list[int], max_blocks: int) -> tuple[int, int]:
        """(hash chain seed after the match, matched blocks) of `ids` in namespace `ns_key`,
        without locking, counting or ticking: what a lower tier continues from."""
        root = self.roots.get(ns_key)
        if root is None:
            return root_hash(ns_key), 0
        node, matched = self.descend(root, ids, max_blocks)
        return node.last_hash, matched

    def descend(self, root: Node, ids: list[int], max_blocks: int) -> tuple[Node, int]:
        """Deepest node whose path equals `ids[: matched * block_size]`, and `matched` (blocks).

        Compares whole slices (C speed); where the query diverges inside an edge, a binary
        search over blocks finds the boundary and the edge is split there.
        """
        bs = self.block_size
        limit = max_blocks * bs
        node, pos = root, 0
        while pos < limit:
            child = node.children.get(tuple(ids[pos : pos + bs]))
            if child is None:
                break
            nb = len(child.block_ids)
            avail = min(nb, (limit - pos) // bs)
            if avail == nb and ids[pos : pos + nb * bs] == child.tokens:
                node, pos = child, pos + nb * bs
                continue
            # Blocks [0, lo) are known to match (block 0 via the dict key); find the last one.
            lo, hi = 1, avail
            ctoks = child.tokens
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if ids[pos + lo * bs : pos + mid * bs] == ctoks[lo * bs : mid * bs]:
                    lo = mid
                else:
                    hi = mid - 1
            return self._split(child, lo), pos // bs + lo
        return node, pos // bs

    def _split(self, child: Node, k: int) -> Node:
        """Cut `child` after its first k blocks; the new upper node is returned.

        The original object keeps the lower part, so references to deeper nodes (live matches
        hold their deepest node) stay valid; the upper part inherits locks and statistics.
        """
        bs = self.block_size
        parent = child.parent
        assert parent is not None and 0 < k < len(child.block_ids)
        upper = self._new_node(parent)
        upper.tokens, child.tokens = child.tokens[: k * bs], child.tokens[k * bs :]
        upper.block_ids, child.block_ids = child.block_ids[:k], child.block_ids[k:]
        upper.block_hashes, child.block_hashes = child.block_hashes[:k], child.block_hashes[k:]
        upper.lock_ref = child.lock_ref
        upper.last_access, upper.created = child.last_access, child.created
        upper.hits, upper.priority = child.hits, child.priority
        upper.policy_state = child.policy_state
        upper.owner = child.owner
        parent.children[tuple(upper.tokens[:bs])] = upper
        upper.children[tuple(child.tokens[:bs])] = child
        child.parent = upper
        self.num_nodes += 1
        return upper

    @staticmethod
    def path(node: Node) -> list[Node]:
        """Nodes from just below the root down to `node`."""
        out: list[Node] = []
        while node.parent is not None:
            out.append(node)
            node = node.parent
        out.reverse()
        return out

    @staticmethod
    def blocks_along(node: Node) -> tuple[list[int], list[int]]:
        """(block ids, block hashes) of the path from the root down to `node`, in order."""
        block_ids: list[int] = []
        hashes: list[int] = []
        for n in RadixTree.path(node):
            block_ids += n.block_ids
            hashes += n.block_hashes
        return block_ids, hashes

    # ----- locks and statistics ----------------------------------------------------------
    def acquire(self, node: Node, hit: bool, priority: int | None = None) -> None:
        """Lock the path to `node` and mark it used now (a hit when `hit`)."""
        now = self._clock
        while node.parent is not None:
            if node.lock_ref == 0:
                self.num_locked_blocks += len(node.block_ids)
                if node.evict_key is not None:
                    self._remove_evictable(node)
            node.lock_ref += 1
            if hit:
                self.policy.on_hit(node, now)  # before the statistics change: it reads the last use
                node.hits += 1
            node.last_access = now
            if priority is not None and priority > node.priority:
                node.priority = priority
            node = node.parent

    def release(self, node: Node) -> list[int]:
        """Unlock the path to `node`; leaves whose last lock goes become evictable.

        Returns the blocks of detached nodes (cleared while locked) that no one holds now.
        """
        freed: list[int] = []
        while node.parent is not None:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.num_locked_blocks -= len(node.block_ids)
                if node.detached:
                    freed += node.block_ids
                elif not node.children:
                    self._add_evictable(node)
            node = node.parent
        return freed

    # ----- growth ----------------------------------------------------------------------
    def attach(self, parent: Node, tokens: list[int], block_ids: list[int], hashes: list[int], priority: int) -> Node:
        """Add new unlocked blocks under `parent` (which must not have a child with that key) as
        a chain of nodes cut where `policy.segments` says (one node by default); returns the leaf."""
        bs = self.block_size
        sizes = self.policy.segments(hashes)
        assert sum(sizes) == len(hashes) and all(n > 0 for n in sizes), f"bad segments {sizes} of {len(hashes)}"
        if parent.evict_key is not None:  # it is a leaf no more
            self._remove_evictable(parent)
        start = 0
        node = parent
        for n in sizes:
            node = self._new_node(parent)
            end = start + n
            if n == len(hashes):  # one node: take the lists as they are, no copy
                node.tokens, node.block_ids, node.block_hashes = tokens, block_ids, hashes
            else:
                node.tokens, node.block_ids = tokens[start * bs : end * bs], block_ids[start:end]
                node.block_hashes = hashes[start:end]
            node.priority = priority
            parent.children[tuple(node.tokens[:bs])] = node
            self.num_blocks += n
            node.owner.blocks += n
            node.owner.group.blocks += n
            self.num_nodes += 1
            self.policy.on_attach(node, self._clock)
            parent, start = node, end
        self._add_evictable(node)
        return node

    # ----- eviction --------------------------------------------------------------------
    def _add_evictable(self, node: Node) -> None:
        key = self.policy.key(node)
        node.evict_key = key
        node.owner.group.evictable.add((key, node.uid))
        self._evictable_nodes[node.uid] = node

    def _remove_evictable(self, node: Node) -> None:
        node.owner.group.evictable.remove((node.evict_key, node.uid))
        del self._evictable_nodes[node.uid]
        node.evict_key = None

    def _victim(self, requester: Group | None) -> tuple[Group | None, int]:
        """The group to evict from next and the most blocks to take from it: the group above
        its share whose smallest key is smallest (at most its excess); else the requester's own
        group (an insert's), or for a plain `evict` any group. (None, 0) when nothing may go."""
        if len(self.groups) == 1:
            g = self.groups[0]
            return (g, g.blocks) if g.evictable else (None, 0)
        best: Group | None = None
        for g in self.groups:
            if g.evictable and g.over and (best is None or g.evictable[0] < best.evictable[0]):
                best = g
        if best is not None:
            return best, best.over
        if requester is not None:
            return (requester, requester.blocks) if requester.evictable else (None, 0)
        for g in self.groups:
            if g.evictable and (best is None or g.evictable[0] < best.evictable[0]):
                best = g
        return (best, best.blocks) if best is not None else (None, 0)

    def evict(self, num_blocks: int, requester: Tenant | None = None) -> list[int]:
        """Remove up to `num_blocks` blocks from unlocked leaves; returns the removed block ids.
        `requester`: the tenant whose insert needs the room (None: a plain eviction)."""
        bs = self.block_size
        if self.policy.generation != self._generation:
            self._rekey()
        group = requester.group if requester is not None else None
        freed: list[int] = []
        while len(freed) < num_blocks:
            g, allowed = self._victim(group)
            if g is None:
                break
            _, uid = g.evictable[0]
            node = self._evictable_nodes[uid]
            take = min(num_blocks - len(freed), len(node.block_ids), allowed)
            now = self._clock
            if self.on_evict is not None:
                self.on_evict(node, len(node.block_ids) - take)
            self.num_blocks -= take
            node.owner.blocks -= take
            g.blocks -= take
            if take < len(node.block_ids):  # trim the tail; the leaf keeps its place
                freed += node.block_ids[-take:]
                gone = node.block_hashes[-take:]
                del node.block_ids[-take:], node.block_hashes[-take:], node.tokens[-take * bs :]
                self.policy.on_evict(node, gone, now)
                continue
            self._remove_evictable(node)
            freed += node.block_ids
            self.policy.on_evict(node, node.block_hashes, now)
            parent = node.parent
            assert parent is not None
            del parent.children[tuple(node.tokens[:bs])]
            node.detached = True
            self.num_nodes -= 1
            if parent.parent is None:
                self._drop_root_if_empty(parent)
            elif not parent.children and parent.lock_ref == 0:
                self._add_evictable(parent)
        return freed

    def _rekey(self) -> None:
        """Recompute every evictable leaf's key after the policy changed its order as a whole.
        O(leaves log leaves); policies change order rarely (see `EvictionPolicy.generation`)."""
        self._generation = self.policy.generation
        for g in self.groups:
            g.evictable = SortedList()
        for node in self._evictable_nodes.values():
            node.evict_key = self.policy.key(node)
            node.owner.group.evictable.add((node.evict_key, node.uid))

    def clear(self) -> list[int]:
        """Detach every node; returns the blocks no one holds now. Locked nodes keep their
        blocks (and their locks) until `release` frees them."""
        freed: list[int] = []
        for node in self.iter_nodes():
            if node.lock_ref == 0:
                freed += node.block_ids
            node.detached = True
            node.evict_key = None
        for root in self.roots.values():
            root.detached = True
        self.roots = {}
        for g in self.groups:
            g.evictable = SortedList()
            g.blocks = 0
        for t in self.tenants.values():
            t.blocks = 0
        self._evictable_nodes = {}
        self.num_blocks = 0
        self.num_nodes = 0
        self.policy.on_clear()
        return freed

    # ----- inspection ------------------------------------------------------------------
    def iter_nodes(self) -> Iterator[Node]:
        """Every non-root node, parents before children."""
        stack = list(self.roots.values())
        while stack:
            node = stack.pop()
            if node.parent is not None:
                yield node
            stack.extend(node.children.values())

    def check(self) -> None:
        """Assert the structural invariants of the tree and its evictable set."""
        bs = self.block_size
        seen_blocks: set[int] = set()
        total = nodes = 0
        evictable: set[int] = set()
        for ns_key, root in self.roots.items():
            assert root.parent is None and root.ns_key == ns_key, "root registered under the wrong key"
            assert root.children or root.lock_ref > 0, f"namespace root {ns_key!r} has no children and no pin"
            assert not root.block_ids and root.lock_ref >= 0, "a root holds blocks or a negative pin count"
        for node in self.iter_nodes():
            nodes += 1
            parent = node.parent
            assert parent is not None and not node.detached, f"{node} is detached but reachable"
            nb = len(node.block_ids)
            assert nb > 0, f"{node} holds no blocks"
            assert len(node.tokens) == nb * bs, f"{node} has {len(node.tokens)} tokens for {nb} blocks"
            assert len(node.block_hashes) == nb, f"{node} has {len(node.block_hashes)} hashes for {nb} blocks"
            assert parent.children.get(tuple(node.tokens[:bs])) is node, f"{node} is not under its first block"
            assert node.lock_ref >= 0, f"{node} has a negative lock count"
            assert parent.parent is None or node.lock_ref <= parent.lock_ref, (
                f"{node} is locked more often than its parent"
            )
            for b in node.block_ids:
                assert b not in seen_blocks, f"block {b} appears in two places in the tree"
                seen_blocks.add(b)
            total += nb
            is_candidate = not node.children and node.lock_ref == 0
            assert (node.evict_key is not None) == is_candidate, (
                f"{node} evictable={node.evict_key is not None} but leaf={not node.children}, lock_ref={node.lock_ref}"
            )
            if is_candidate:
                evictable.add(node.uid)
        assert total == self.num_blocks, f"tree counts {self.num_blocks} blocks, holds {total}"
        assert nodes == self.num_nodes, f"tree counts {self.num_nodes} nodes, holds {nodes}"
        assert set(self._evictable_nodes) == evictable, "evictable set differs from the unlocked leaves"
        assert sum(len(g.evictable) for g in self.groups) == len(evictable), "evictable lists and map differ in size"
        for g in self.groups:
            for key, uid in g.evictable:
                node = self._evictable_nodes[uid]
                assert node.evict_key == key, f"node {uid} is listed under a stale key"
                assert node.owner.group is g, f"node {uid} is listed in another tenant's group"
        per_tenant: dict[bytes, int] = {}
        for node in self.iter_nodes():
            per_tenant[node.owner.key] = per_tenant.get(node.owner.key, 0) + len(node.block_ids)
        for t in self.tenants.values():
            assert t.blocks == per_tenant.get(t.key, 0), f"tenant {t.name!r} counts {t.blocks} blocks"
        for g in self.groups:
            want = sum(t.blocks for t in self.tenants.values() if t.group is g)
            assert g.blocks == want, f"a group counts {g.blocks} blocks, its tenants hold {want}"

    def check_locks(self, held: Iterable[Node], pinned: Iterable[Node]) -> list[int]:
        """Assert that every lock count is explained: each node's `lock_ref` equals the number
        of `held` path ends (live matches, in-flight inserts) whose path includes it, each
        root's equals its `pinned` entries, and `num_locked_blocks` is the blocks on those
        paths. Returns the blocks that only those holders keep (of nodes a `clear` detached).
        O(nodes + total path length)."""
        locks: dict[int, int] = {}
        on_paths: dict[int, Node] = {}
        for end in held:
            path = self.path(end)
            assert len({n.detached for n in path}) == 1, f"the path to {end} is partly detached"
            for n in path:
                locks[n.uid] = locks.get(n.uid, 0) + 1
                on_paths[n.uid] = n
        pins: dict[int, int] = {}
        for root in pinned:
            pins[root.uid] = pins.get(root.uid, 0) + 1
        for root in self.roots.values():
            want = pins.get(root.uid, 0)
            assert root.lock_ref == want, f"namespace root {root.ns_key!r} is pinned {root.lock_ref} times, not {want}"
        for node in self.iter_nodes():
            want = locks.get(node.uid, 0)
            assert node.lock_ref == want, f"{node} has lock_ref {node.lock_ref}, its holders give {want}"
        detached = [n for n in on_paths.values() if n.detached]
        for n in detached:
            assert n.lock_ref == locks[n.uid], f"detached {n} has lock_ref {n.lock_ref}, expected {locks[n.uid]}"
        locked = sum(len(n.block_ids) for n in on_paths.values())
        assert locked == self.num_locked_blocks, (
            f"{self.num_locked_blocks} blocks counted locked, their holders lock {locked}"
        )
        return [b for n in detached for b in n.block_ids]
