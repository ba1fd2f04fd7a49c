"""An interactive shell in the Mininet style: ``<node|pod> <command>`` runs the command
inside that machine, with other node, pod and external names replaced by their IPs.

    netsim> client curl -s web-8t954n9w2c-m8p4m:8080/clientip
    netsim> node-1 ip route
"""
from __future__ import annotations

import cmd
import re
import shlex
import subprocess

from .apply import labstate, netns
from .plan.state import LabPlan
from .report import status_text


class LabShell(cmd.Cmd):
    intro = "netsim shell: '<node|pod|external> <command>' runs it there; 'help' lists the rest."

    def __init__(self, plan: LabPlan):
        super().__init__()
        self.plan = plan
        self.net = None
        self.prompt = f"netsim:{plan.lab}> "
        self.targets = {n.name: (n.netns, n.address) for n in plan.nodes}
        self.targets.update({e.name: (e.netns, e.address) for e in plan.externals})
        for p in plan.pods:
            self.targets[p.name] = self.targets[p.key] = (p.netns, p.ip)
        alternatives = "|".join(re.escape(n) for n in sorted(self.targets, key=len, reverse=True))
        self._names = re.compile(rf"(?<![\w.-])(?:{alternatives})(?![\w-])")

    def default(self, line: str) -> None:
        first, _, rest = line.strip().partition(" ")
        if first not in self.targets:
            print(f"*** unknown node, pod or command: {first!r} (try 'nodes' or 'help')")
            return
        if not rest:
            rest = "bash"
        words = shlex.split(rest)
        words = [self._substitute(w) for w in words]
        subprocess.run(["ip", "netns", "exec", self.targets[first][0], "sh", "-c", shlex.join(words)])

    def _substitute(self, word: str) -> str:
        """Replace whole names (also inside ``name:port`` or URLs) with their IPs."""
        return self._names.sub(lambda m: self.targets[m.group(0)][1], word)

    def do_nodes(self, _: str) -> None:
        "List nodes, externals and pods."
        print("nodes:", " ".join(n.name for n in self.plan.nodes))
        print("externals:", " ".join(e.name for e in self.plan.externals) or "-")
        print("pods:", " ".join(p.name for p in self.plan.pods) or "-")

    def do_status(self, _: str) -> None:
        "Show the lab's nodes, subnets and pods."
        print(status_text(self.plan, labstate.LabState.load(self.plan.lab)))

    def do_net(self, _: str) -> None:
        "Show every namespace's links (ip -br link)."
        for ns in self.plan.namespaces:
            if netns.exists(ns.name):
                out = subprocess.run(["ip", "-n", ns.name, "-br", "addr"], capture_output=True, text=True).stdout
                print(f"{ns.owner} ({ns.role}):\n  " + out.strip().replace("\n", "\n  "))

    def do_py(self, line: str) -> None:
        "Evaluate Python with 'net' bound to the lab's Mininet hosts: py net['node-1'].cmd('ip route')"
        from .runtime.mnhost import LabNet
        if self.net is None:
            self.net = LabNet(self.plan)
        try:
            result = eval(line, {"net": self.net, "plan": self.plan})
            if result is not None:
                print(result)
        except Exception as exc:   # the user's expression: show the error, keep the shell
            print(f"*** {type(exc).__name__}: {exc}")

    def do_exit(self, _: str) -> bool:
        "Leave the shell (the lab keeps running)."
        return True

    do_quit = do_exit
    do_EOF = do_exit

    def postloop(self) -> None:
        if self.net is not None:
            self.net.stop()

    def emptyline(self) -> None:
        pass
