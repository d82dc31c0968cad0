"""Min-cost flow on a small residual graph: what the planner (`planner._complete`) uses to find
the balanced expert placement that moves the fewest copies.

Why apart: it is a general algorithm, not placement policy, and the planner stays readable
without it. Pure: no I/O, no clock. Not guaranteed: speed on large graphs (it is written for
experts x devices, a few thousand edges); the caller must start from a cheapest flow of its
size (an empty one, or one of cost 0), which successive shortest paths need to stay exact.
"""

from __future__ import annotations

import heapq


class Graph:
    """A residual graph for min-cost flow; edge i and its reverse are i and i ^ 1."""

    def __init__(self, num_nodes: int) -> None:
        self.adj: list[list[int]] = [[] for _ in range(num_nodes)]
        self.to: list[int] = []
        self.cap: list[int] = []
        self.cost: list[int] = []

    def add(self, u: int, v: int, cap: int, cost: int, flow: int = 0) -> int:
        assert 0 <= flow <= cap
        i = len(self.to)
        self.adj[u].append(i)
        self.adj[v].append(i + 1)
        self.to += [v, u]
        self.cap += [cap - flow, flow]
        self.cost += [cost, -cost]
        return i

    def min_cost_flow(self, s: int, t: int, need: int) -> None:
        """Push `need` more units s -> t at least cost: primal-dual, i.e. Dijkstra on reduced
        costs, then a Dinic blocking flow on the zero-reduced-cost edges, until done. The
        current flow must be a cheapest one of its size (here: all of cost 0)."""
        n, to, cap, cost, adj = len(self.adj), self.to, self.cap, self.cost, self.adj
        pot = [0] * n
        while need > 0:
            inf = float("inf")
            dist = [inf] * n
            dist[s] = 0
            heap = [(0, s)]
            while heap:
                du, u = heapq.heappop(heap)
                if du > dist[u]:
                    continue
                pu = pot[u]
                for i in adj[u]:
                    if cap[i] > 0:
                        v = to[i]
                        dv = du + cost[i] + pu - pot[v]
                        if dv < dist[v]:
                            dist[v] = dv
                            heapq.heappush(heap, (dv, v))
            assert dist[t] < inf, "a balanced placement always exists"
            pot = [p + d if d < inf else p for p, d in zip(pot, dist)]
            while need > 0:
                level = [-1] * n
                level[s] = 0
                queue = [s]
                for u in queue:
                    for i in adj[u]:
                        v = to[i]
                        if cap[i] > 0 and level[v] < 0 and cost[i] + pot[u] - pot[v] == 0:
                            level[v] = level[u] + 1
                            queue.append(v)
                if level[t] < 0:
                    break
                it = [0] * n

                def dfs(u: int, limit: int) -> int:
                    if u == t:
                        return limit
                    edges = adj[u]
                    while it[u] < len(edges):
                        i = edges[it[u]]
                        v = to[i]
                        if cap[i] > 0 and level[v] == level[u] + 1 and cost[i] + pot[u] - pot[v] == 0:
                            got = dfs(v, min(limit, cap[i]))
                            if got:
                                cap[i] -= got
                                cap[i ^ 1] += got
                                return got
                        it[u] += 1
                    return 0

                while need > 0:
                    got = dfs(s, need)
                    if not got:
                        break
                    need -= got
