#!/usr/bin/env python3
"""Writes the Grafana dashboards of the compose cluster (dashboards/*.json).

    python3 deployments/compose/grafana/dashboards.py          # write them
    python3 deployments/compose/grafana/dashboards.py --check  # exit 1 if a file differs
    python3 deployments/compose/grafana/dashboards.py --core   # uid<TAB>title of core panels

Edit the panels here, not the JSON. Queries use only the metrics listed in
docs/metrics.md (plus Prometheus' own `up`). Panels marked core must return
data on a running compose cluster (scripts/compose-test.sh checks it, and
that every query evaluates without error against the live Prometheus).

Label conventions (deployments/compose/prometheus/prometheus.yml): job
(coordinator, agent), instance, node (the host name), zone (agents). Gauges
that only the leader keeps current are read through LEADER.
"""

import json
import os
import sys

DS = {"type": "prometheus", "uid": "prometheus"}
RATE = "$__rate_interval"
# Keeps the series of the coordinator that is the Raft leader.
LEADER = 'and on(instance) (cloudless_raft_is_leader{job="coordinator"} == 1)'
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "dashboards")


class Dash:
    """One dashboard: panels laid out left to right, top to bottom, 24 wide."""

    def __init__(self, uid, title, description):
        self.uid, self.title, self.description = uid, title, description
        self.panels, self.core = [], []
        self.x = self.y = self.row_h = 0
        self.next_id = 1

    def _place(self, w, h):
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def row(self, title):
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        self.panels.append({"id": self._id(), "type": "row", "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def _id(self):
        i = self.next_id
        self.next_id += 1
        return i

    def _panel(self, kind, title, targets, w, h, unit, description, core, instant, options, field):
        refs = "ABCDEFGH"
        panel = {
            "id": self._id(),
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": self._place(w, h),
            "targets": [
                {
                    "refId": refs[i],
                    "datasource": DS,
                    "expr": expr,
                    "legendFormat": legend,
                    "instant": instant,
                    "range": not instant,
                    **({"format": "table"} if kind == "table" else {}),
                }
                for i, (expr, legend) in enumerate(targets)
            ],
            "fieldConfig": {"defaults": {"unit": unit or "short", **field}, "overrides": []},
            "options": options,
        }
        self.panels.append(panel)
        if core:
            self.core.append(title)
        return panel

    def ts(self, title, targets, unit=None, w=12, h=8, description="", core=False, stack=False, decimals=None):
        field = {"custom": {"lineWidth": 1, "fillOpacity": 10 if not stack else 30,
                            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                            "showPoints": "never", "spanNulls": False}}
        if decimals is not None:
            field["decimals"] = decimals
        return self._panel("timeseries", title, targets, w, h, unit, description, core, False,
                           {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                            "tooltip": {"mode": "multi", "sort": "desc"}}, field)

    def stat(self, title, expr, unit=None, w=4, h=4, description="", core=False, mappings=None,
             thresholds=None):
        field = {"mappings": mappings or [],
                 "thresholds": {"mode": "absolute",
                                "steps": thresholds or [{"color": "green", "value": None}]}}
        return self._panel("stat", title, [(expr, "")], w, h, unit, description, core, True,
                           {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                            "colorMode": "value", "graphMode": "none", "textMode": "auto",
                            "justifyMode": "auto", "orientation": "auto"}, field)

    def table(self, title, targets, unit=None, w=12, h=8, description="", core=False):
        return self._panel("table", title, targets, w, h, unit, description, core, True,
                           {"showHeader": True, "cellHeight": "sm",
                            "footer": {"show": False, "reducer": ["sum"], "fields": ""}},
                           {"custom": {"align": "auto", "filterable": False}})

    def alertlist(self, title, w=12, h=8):
        self.panels.append({
            "id": self._id(), "type": "alertlist", "title": title,
            "description": "Grafana-managed alert rules of the Cloudless folder (provisioning/alerting/cloudless.yml).",
            "gridPos": self._place(w, h),
            "options": {"viewMode": "list", "groupMode": "default", "maxItems": 20, "sortOrder": 1,
                        "dashboardAlerts": False, "alertName": "", "folder": None,
                        "stateFilter": {"firing": True, "pending": True, "noData": False, "normal": False,
                                        "error": True},
                        "alertInstanceLabelFilter": ""},
        })

    def json(self):
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["cloudless"],
            "timezone": "browser",
            "editable": True,
            "graphTooltip": 1,
            "schemaVersion": 39,
            "version": 1,
            "refresh": "10s",
            "time": {"from": "now-30m", "to": "now"},
            "timepicker": {},
            "fiscalYearStartMonth": 0,
            "liveNow": False,
            "annotations": {"list": [{
                "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                "name": "Annotations & Alerts", "type": "dashboard"}]},
            "templating": {"list": []},
            "links": [{"asDropdown": True, "icon": "external link", "includeVars": False,
                       "keepTime": True, "tags": ["cloudless"], "targetBlank": False,
                       "title": "Cloudless", "type": "dashboards"}],
            "panels": self.panels,
        }


YES_NO = [{"type": "value", "options": {"0": {"text": "no", "color": "red"},
                                        "1": {"text": "yes", "color": "green"}}}]
RED_IF_ABOVE_0 = [{"color": "green", "value": None}, {"color": "red", "value": 1}]


def overview():
    d = Dash("cloudless-overview", "Cloudless / Cluster overview",
             "The whole fabric at a glance: coordinators, nodes, workloads, API traffic.")
    d.stat("Coordinators up", 'sum(up{job="coordinator"})', core=True,
           description="Coordinators answering Prometheus' scrapes.")
    d.stat("Agents up", 'sum(up{job="agent"})', core=True,
           description="Agents whose /metrics answers.")
    d.stat("Raft leader", 'max(cloudless_raft_is_leader{job="coordinator"})', core=True, mappings=YES_NO,
           description="Whether some coordinator is the Raft leader.")
    d.stat("Raft term", 'max(cloudless_raft_term{job="coordinator"})', core=True)
    d.stat("Voters", 'max(cloudless_raft_voters{job="coordinator"})', core=True)
    d.stat("Nodes Ready", f'sum(cloudless_membership_nodes{{phase=~"(?i)ready"}} {LEADER})', core=True,
           description="Nodes in phase Ready, as the leader counts them.")
    d.stat("Nodes not Ready", f'sum(cloudless_membership_nodes{{phase!~"(?i)ready"}} {LEADER})', core=True,
           thresholds=RED_IF_ABOVE_0, description="Nodes Pending, Suspect or Down.")
    d.stat("Workloads", 'max(cloudless_workloads{job="coordinator"})')
    d.stat("Replicas", 'sum(max by (state) (cloudless_replicas{job="coordinator"}))')
    d.stat("Unplaced replicas", 'sum(max by (reason) (cloudless_scheduler_unplaced_replicas{job="coordinator"}))',
           thresholds=RED_IF_ABOVE_0, description="Replicas the scheduler could not place (reasons: Scheduler dashboard).")
    d.stat("Containers on agents", 'sum(cloudless_agent_containers{job="agent"})')
    d.stat("First certificate expiry", 'min(cloudless_certificate_expiry_timestamp_seconds{job="coordinator"}) - time()',
           unit="dtdurations", description="Time left on the certificate (coordinator or node) that expires first.")
    d.ts("Nodes by phase", [(f'sum by (phase) (cloudless_membership_nodes {LEADER})', "{{phase}}")],
         core=True, stack=True)
    d.ts("Replicas by state", [('max by (state) (cloudless_replicas{job="coordinator"})', "{{state}}")], stack=True)
    d.ts("API calls per second by status", [(f'sum by (code) (rate(cloudless_grpc_requests_total{{job="coordinator"}}[{RATE}]))', "{{code}}")],
         unit="reqps")
    d.ts("Raft commits per second", [(f'deriv(cloudless_raft_commit_index{{job="coordinator"}}[{RATE}])', "{{node}}")],
         core=True, description="Growth of each coordinator's commit index.")
    d.ts("Resident memory", [('process_resident_memory_bytes{job=~"coordinator|agent"}', "{{node}}")], unit="bytes")
    d.ts("CPU", [(f'rate(process_cpu_seconds_total{{job=~"coordinator|agent"}}[{RATE}])', "{{node}}")],
         unit="percentunit")
    d.table("Versions", [('cloudless_build_info', "")],
            description="cloudless_build_info of every component: its version as a label.")
    d.alertlist("Alerts")
    return d


def raft():
    d = Dash("cloudless-raft", "Cloudless / Raft and coordinators",
             "Raft state of each coordinator, proposals, latency, storage, the gRPC API and the processes.")
    d.row("Raft")
    d.ts("Leader", [('cloudless_raft_is_leader{job="coordinator"}', "{{node}}")], w=8, core=True, decimals=0,
         description="1 on the coordinator that is the leader.")
    d.ts("Term", [('cloudless_raft_term{job="coordinator"}', "{{node}}")], w=8, core=True, decimals=0)
    d.ts("Voters", [('cloudless_raft_voters{job="coordinator"}', "{{node}}")], w=8, core=True, decimals=0)
    d.ts("Log indexes", [
        ('cloudless_raft_last_log_index{job="coordinator"}', "{{node}} last log"),
        ('cloudless_raft_commit_index{job="coordinator"}', "{{node}} committed"),
        ('cloudless_raft_applied_index{job="coordinator"}', "{{node}} applied"),
        ('cloudless_raft_snapshot_index{job="coordinator"}', "{{node}} snapshot"),
    ], core=True)
    d.ts("Replication and apply lag", [
        ('scalar(max(cloudless_raft_last_log_index{job="coordinator"})) - cloudless_raft_last_log_index{job="coordinator"}',
         "{{node}} entries behind the longest log"),
        ('cloudless_raft_commit_index{job="coordinator"} - cloudless_raft_applied_index{job="coordinator"}',
         "{{node}} committed, not applied"),
    ], core=True)
    d.ts("Leader changes", [(f'increase(cloudless_raft_leader_changes_total{{job="coordinator"}}[{RATE}])', "{{node}}")],
         w=8, core=True, description="Changes of the leader each coordinator knows (one election counts once on each).")
    d.ts("Known leader id", [('cloudless_raft_leader_id{job="coordinator"}', "{{node}}")], w=8, core=True,
         description="The node id each coordinator follows; 0 = none known.")
    d.ts("Proposals per second", [(f'rate(cloudless_raft_proposals_total{{job="coordinator"}}[{RATE}])', "{{node}}")],
         w=8, unit="ops")
    d.ts("Propose to commit", [
        (f'histogram_quantile(0.5, sum by (node, le) (rate(cloudless_raft_proposal_seconds_bucket{{job="coordinator"}}[{RATE}])))', "{{node}} p50"),
        (f'histogram_quantile(0.99, sum by (node, le) (rate(cloudless_raft_proposal_seconds_bucket{{job="coordinator"}}[{RATE}])))', "{{node}} p99"),
    ], unit="s")
    d.ts("Apply latency", [
        (f'histogram_quantile(0.5, sum by (node, le) (rate(cloudless_raft_apply_latency_seconds_bucket{{job="coordinator"}}[{RATE}])))', "{{node}} p50"),
        (f'histogram_quantile(0.99, sum by (node, le) (rate(cloudless_raft_apply_latency_seconds_bucket{{job="coordinator"}}[{RATE}])))', "{{node}} p99"),
    ], unit="s", description="Time to apply one batch of committed entries.")
    d.ts("Requests per log entry", [
        (f'histogram_quantile(0.5, sum by (node, le) (rate(cloudless_raft_proposal_batch_requests_bucket{{job="coordinator"}}[{RATE}])))', "{{node}} p50"),
        (f'histogram_quantile(0.99, sum by (node, le) (rate(cloudless_raft_proposal_batch_requests_bucket{{job="coordinator"}}[{RATE}])))', "{{node}} p99"),
    ], w=8, description="How many requests the proposer batched into one Raft entry.")
    d.ts("Snapshot build time", [
        (f'histogram_quantile(0.99, sum by (node, le) (rate(cloudless_raft_snapshot_seconds_bucket{{job="coordinator"}}[{RATE}])))', "{{node}} p99"),
    ], w=8, unit="s")
    d.ts("Raft log size", [('cloudless_raft_log_bytes{job="coordinator"}', "{{node}}")], w=8, unit="bytes")
    d.ts("Snapshot size", [('cloudless_raft_snapshot_bytes{job="coordinator"}', "{{node}}")], w=8, unit="bytes")
    d.ts("Raft disk free", [('cloudless_raft_disk_free_bytes{job="coordinator"} / cloudless_raft_disk_total_bytes{job="coordinator"}', "{{node}}")],
         w=8, unit="percentunit", description="Free part of the file system holding each data dir (alert below 10 %).")
    d.ts("Raft disk free bytes", [('cloudless_raft_disk_free_bytes{job="coordinator"}', "{{node}}")], w=8, unit="bytes")
    d.row("gRPC API")
    d.ts("Calls per second by method", [(f'sum by (service, method) (rate(cloudless_grpc_requests_total{{job="coordinator"}}[{RATE}]))', "{{service}}/{{method}}")],
         unit="reqps")
    d.ts("Failed calls per second", [(f'sum by (method, code) (rate(cloudless_grpc_requests_total{{job="coordinator", code!="Ok"}}[{RATE}]))', "{{method}} {{code}}")],
         unit="reqps", description="Every status but Ok, by method.")
    d.ts("Latency p99 by method", [(f'histogram_quantile(0.99, sum by (service, method, le) (rate(cloudless_grpc_request_seconds_bucket{{job="coordinator"}}[{RATE}])))', "{{service}}/{{method}}")],
         unit="s", description="Time to the response headers (for streams: to open them).")
    d.ts("Latency p50 by method", [(f'histogram_quantile(0.5, sum by (service, method, le) (rate(cloudless_grpc_request_seconds_bucket{{job="coordinator"}}[{RATE}])))', "{{service}}/{{method}}")],
         unit="s")
    d.row("Processes")
    d.ts("CPU", [(f'rate(process_cpu_seconds_total{{job="coordinator"}}[{RATE}])', "{{node}}")], w=8, unit="percentunit")
    d.ts("Resident memory", [('process_resident_memory_bytes{job="coordinator"}', "{{node}}")], w=8, unit="bytes")
    d.ts("Open file descriptors", [('process_open_fds{job="coordinator"}', "{{node}}")], w=8)
    d.ts("Uptime", [('time() - process_start_time_seconds{job="coordinator"}', "{{node}}")], w=12, unit="s")
    d.ts("Coordinator certificates: time left", [('cloudless_certificate_expiry_timestamp_seconds{job="coordinator", kind="coordinator"} - time()', "{{subject}}")],
         w=12, unit="s", description="Renewed two thirds into their lifetime (tls.coordinator_cert_lifetime_s).")
    return d


def scheduler():
    d = Dash("cloudless-scheduler", "Cloudless / Scheduler and reconciler",
             "The leader's reconcile loop: passes, decisions, Raft entries, duration; unplaced replicas.")
    d.ts("Reconcile passes per second", [(f'rate(cloudless_reconcile_passes_total{{job="coordinator"}}[{RATE}])', "{{node}}")],
         w=8, core=True, unit="ops", description="Only the leader runs passes.")
    d.ts("Passes that decided something", [(f'rate(cloudless_reconcile_decisions_total{{job="coordinator"}}[{RATE}])', "{{node}}")],
         w=8, core=True, unit="ops")
    d.ts("Raft entries committed by passes", [(f'rate(cloudless_reconcile_raft_entries_total{{job="coordinator"}}[{RATE}])', "{{node}}")],
         w=8, core=True, unit="ops")
    d.ts("Pass duration", [
        (f'histogram_quantile(0.5, sum by (le) (rate(cloudless_reconcile_pass_seconds_bucket{{job="coordinator"}}[{RATE}])))', "p50"),
        (f'histogram_quantile(0.99, sum by (le) (rate(cloudless_reconcile_pass_seconds_bucket{{job="coordinator"}}[{RATE}])))', "p99"),
    ], core=True, unit="s", description="Read the state, decide, commit.")
    d.ts("Entries per deciding pass", [
        (f'sum(rate(cloudless_reconcile_raft_entries_total{{job="coordinator"}}[{RATE}])) / sum(rate(cloudless_reconcile_decisions_total{{job="coordinator"}}[{RATE}]))', "entries per decision"),
    ], description="Above 1 when decisions are split to stay under raft.max_entry_bytes.")
    d.ts("Unplaced replicas by reason", [('max by (reason) (cloudless_scheduler_unplaced_replicas{job="coordinator"})', "{{reason}}")],
         stack=True, description="Replicas no node can take, by the reason the scheduler gives.")
    d.ts("Scheduler decisions by result", [(f'sum by (result) (rate(cloudless_scheduler_decisions_total{{job="coordinator"}}[{RATE}]))', "{{result}}")],
         unit="ops", description="placed: replicas given a node; unplaced: counted at every pass a replica waits.")
    d.ts("Scheduler time per pass", [
        (f'histogram_quantile(0.5, sum by (le) (rate(cloudless_scheduler_decision_seconds_bucket{{job="coordinator"}}[{RATE}])))', "p50"),
        (f'histogram_quantile(0.99, sum by (le) (rate(cloudless_scheduler_decision_seconds_bucket{{job="coordinator"}}[{RATE}])))', "p99"),
    ], unit="s")
    d.ts("Workloads and replicas", [
        ('max(cloudless_workloads{job="coordinator"})', "workloads"),
        ('sum(max by (state) (cloudless_replicas{job="coordinator"}))', "replicas"),
    ])
    return d


def nodes():
    d = Dash("cloudless-nodes", "Cloudless / Nodes and devices",
             "Membership (phases, heartbeats, reliability, capacity and requests) as the coordinators see it, and each agent: connection, heartbeat round trip, power, process.")
    d.row("Membership (leader)")
    d.ts("Nodes by phase", [(f'sum by (phase) (cloudless_membership_nodes {LEADER})', "{{phase}}")], w=8,
         core=True, stack=True)
    d.ts("Phase changes", [(f'sum by (phase) (increase(cloudless_membership_phase_changes_total{{job="coordinator"}}[{RATE}]))', "to {{phase}}")],
         w=8, core=True, description="Node phase changes committed, by new phase.")
    d.ts("Heartbeats accepted per second", [(f'sum(rate(cloudless_membership_heartbeats_total{{job="coordinator"}}[{RATE}]))', "heartbeats")],
         w=8, core=True, unit="ops")
    d.ts("Node reliability", [('max by (node) (cloudless_node_reliability{job="coordinator"})', "{{node}}")], w=8,
         core=True, description="0 to 1, from each node's time Ready and the times it went Down; placement prefers reliable nodes.")
    d.ts("CPU: capacity and requested", [
        ('max by (node) (cloudless_node_capacity_cpu_cores{job="coordinator"})', "{{node}} capacity"),
        ('max by (node) (cloudless_node_requested_cpu_cores{job="coordinator"})', "{{node}} requested"),
    ], w=8, core=True, description="What each node offers (as placement trusts it) and what its replicas request.")
    d.ts("Memory: capacity and requested", [
        ('max by (node) (cloudless_node_capacity_memory_bytes{job="coordinator"})', "{{node}} capacity"),
        ('max by (node) (cloudless_node_requested_memory_bytes{job="coordinator"})', "{{node}} requested"),
    ], w=8, unit="bytes", core=True)
    d.row("Agents")
    d.ts("Agents answering scrapes", [('up{job="agent"}', "{{node}} ({{zone}})")], w=8, core=True, decimals=0)
    d.ts("Connected to a coordinator", [('cloudless_agent_connected{job="agent"}', "{{node}}")], w=8, decimals=0)
    d.ts("Disconnected for", [('cloudless_agent_disconnected_seconds{job="agent"}', "{{node}}")], w=8, unit="s")
    d.ts("Heartbeat round trip", [
        (f'histogram_quantile(0.5, sum by (node, le) (rate(cloudless_agent_heartbeat_rtt_seconds_bucket{{job="agent"}}[{RATE}])))', "{{node}} p50"),
        (f'histogram_quantile(0.99, sum by (node, le) (rate(cloudless_agent_heartbeat_rtt_seconds_bucket{{job="agent"}}[{RATE}])))', "{{node}} p99"),
    ], unit="s")
    d.ts("Battery", [('cloudless_agent_battery_percent{job="agent"}', "{{node}}")], w=6, unit="percent")
    d.ts("On battery", [('cloudless_agent_on_battery{job="agent"}', "{{node}}")], w=6, decimals=0)
    d.ts("Agent CPU", [(f'rate(process_cpu_seconds_total{{job="agent"}}[{RATE}])', "{{node}}")], w=8, unit="percentunit")
    d.ts("Agent resident memory", [('process_resident_memory_bytes{job="agent"}', "{{node}}")], w=8, unit="bytes")
    d.ts("Agent open file descriptors", [('process_open_fds{job="agent"}', "{{node}}")], w=8)
    d.table("Node certificates: time left", [('cloudless_certificate_expiry_timestamp_seconds{job="coordinator", kind="node"} - time()', "{{subject}}")],
            w=24, unit="s", description="Node certificates are renewed two thirds into node_cert_lifetime_s.")
    return d


def workloads():
    d = Dash("cloudless-workloads", "Cloudless / Workloads and replicas",
             "Desired, Ready and updated replicas per workload (rollouts), replica states, placement failures, and the containers on the agents.")
    d.row("Cluster")
    d.stat("Workloads", 'max(cloudless_workloads{job="coordinator"})', w=6)
    d.stat("Replicas", 'sum(max by (state) (cloudless_replicas{job="coordinator"}))', w=6)
    d.stat("Missing Ready replicas",
           'sum(max by (namespace, workload) (cloudless_workload_replicas_desired{job="coordinator"}) - max by (namespace, workload) (cloudless_workload_replicas_ready{job="coordinator"}))',
           w=6, thresholds=RED_IF_ABOVE_0)
    d.stat("Unplaced replicas", 'sum(max by (reason) (cloudless_scheduler_unplaced_replicas{job="coordinator"}))', w=6,
           thresholds=RED_IF_ABOVE_0)
    d.ts("Desired and Ready per workload", [
        ('max by (namespace, workload) (cloudless_workload_replicas_desired{job="coordinator"})', "{{namespace}}/{{workload}} desired"),
        ('max by (namespace, workload) (cloudless_workload_replicas_ready{job="coordinator"})', "{{namespace}}/{{workload}} ready"),
    ], decimals=0)
    d.ts("Rollouts: replicas on the current template", [
        ('max by (namespace, workload) (cloudless_workload_replicas_updated{job="coordinator"})', "{{namespace}}/{{workload}} updated"),
        ('max by (namespace, workload) (cloudless_workload_replicas_desired{job="coordinator"})', "{{namespace}}/{{workload}} desired"),
    ], decimals=0, core=True, description="A rollout is done when every replica runs the current template and is Ready.")
    d.ts("Template per workload", [('max by (namespace, workload) (cloudless_workload_template{job="coordinator"})', "{{namespace}}/{{workload}}")],
         decimals=0, description="Each step is a rollout: a change to the spec that needs new containers.")
    d.ts("Replicas by state", [('max by (state) (cloudless_replicas{job="coordinator"})', "{{state}}")], stack=True, decimals=0)
    d.ts("Unplaced replicas by reason", [('max by (reason) (cloudless_scheduler_unplaced_replicas{job="coordinator"})', "{{reason}}")],
         stack=True, decimals=0, description="Placement failures: why the scheduler found no node.")
    d.table("Workloads", [
        ('max by (namespace, workload) (cloudless_workload_replicas_desired{job="coordinator"})', ""),
        ('max by (namespace, workload) (cloudless_workload_replicas_ready{job="coordinator"})', ""),
    ], description="A: desired, B: Ready.")
    d.row("Containers on the agents")
    d.ts("Containers by state", [('sum by (state) (cloudless_agent_containers{job="agent"})', "{{state}}")], w=8, stack=True, decimals=0)
    d.ts("Containers per agent", [('sum by (node) (cloudless_agent_containers{job="agent"})', "{{node}}")], w=8, decimals=0)
    d.ts("Container starts", [(f'sum by (node) (increase(cloudless_agent_container_starts_total{{job="agent"}}[{RATE}]))', "{{node}}")],
         w=8, description="Starts and restarts.")
    d.ts("Container restarts and OOM kills", [
        (f'sum by (node) (increase(cloudless_agent_container_restarts_total{{job="agent"}}[{RATE}]))', "{{node}} restarts"),
        (f'sum by (node) (increase(cloudless_agent_oom_kills_total{{job="agent"}}[{RATE}]))', "{{node}} OOM kills"),
    ], w=8, decimals=0)
    d.ts("Container exits by reason", [(f'sum by (reason) (increase(cloudless_agent_container_exits_total{{job="agent"}}[{RATE}]))', "{{reason}}")],
         w=8)
    d.ts("Image pulls by result", [(f'sum by (result) (increase(cloudless_agent_image_pulls_total{{job="agent"}}[{RATE}]))', "{{result}}")],
         w=8)
    d.ts("Image pull time", [
        (f'histogram_quantile(0.9, sum by (le) (rate(cloudless_agent_image_pull_seconds_bucket{{job="agent"}}[{RATE}])))', "p90"),
    ], w=8, unit="s")
    d.ts("Image bytes downloaded", [(f'sum by (node) (rate(cloudless_agent_image_pull_bytes_total{{job="agent"}}[{RATE}]))', "{{node}}")],
         w=8, unit="Bps", description="Layers already on the node are not counted.")
    d.ts("Probe results", [(f'sum by (probe, result) (rate(cloudless_agent_probe_results_total{{job="agent"}}[{RATE}]))', "{{probe}} {{result}}")],
         unit="ops")
    d.ts("Replica CPU (top 10)", [(f'topk(10, rate(cloudless_agent_replica_cpu_seconds_total{{job="agent"}}[{RATE}]))', "{{replica}}")],
         w=6, unit="percentunit")
    d.ts("Replica memory (top 10)", [('topk(10, cloudless_agent_replica_memory_bytes{job="agent"})', "{{replica}}")],
         w=6, unit="bytes")
    d.ts("Replica network received (top 10)", [(f'topk(10, rate(cloudless_agent_replica_network_receive_bytes_total{{job="agent"}}[{RATE}]))', "{{replica}}")],
         w=6, unit="Bps")
    d.ts("Replica network sent (top 10)", [(f'topk(10, rate(cloudless_agent_replica_network_transmit_bytes_total{{job="agent"}}[{RATE}]))', "{{replica}}")],
         w=6, unit="Bps")
    return d


def overlay():
    d = Dash("cloudless-overlay", "Cloudless / Overlay and NAT",
             "The QUIC overlay: peers connected to each coordinator relay and agent, relayed and refused streams; the agents' service proxies.")
    d.ts("Connected overlay peers", [('cloudless_overlay_connected_peers', "{{job}} {{node}}")], core=True, decimals=0,
         description="Coordinators: nodes with a live connection to the relay. Agents: peers connected.")
    d.ts("Connections accepted", [(f'rate(cloudless_overlay_connections_accepted_total{{job="coordinator"}}[{RATE}])', "{{node}}")],
         core=True, unit="ops", description="Accepted after the certificate check.")
    d.ts("Streams relayed", [(f'rate(cloudless_overlay_streams_relayed_total{{job="coordinator"}}[{RATE}])', "{{node}}")],
         core=True, unit="ops", description="Streams between two nodes carried by a coordinator (devices that cannot dial each other).")
    d.ts("Streams refused", [(f'rate(cloudless_overlay_streams_refused_total{{job="coordinator"}}[{RATE}])', "{{node}}")],
         core=True, unit="ops", description="Bad requests or unreachable nodes.")
    d.ts("Overlay stream bytes", [
        (f'sum by (node, direction) (rate(cloudless_overlay_stream_bytes_total{{job="agent"}}[{RATE}]))', "{{node}} {{direction}}"),
    ], unit="Bps", description="Payload carried by each agent's overlay streams (upstreams, services across nodes, ingress).")
    d.ts("NAT traversal by method and result", [
        (f'sum by (method, result) (increase(cloudless_overlay_traversal_attempts_total{{job="agent"}}[{RATE}]))', "{{method}} {{result}}"),
    ], decimals=0, description="How agents reached peers with no live connection: a direct dial, hole punching after a relay's introduction, or a stream through a relay.")
    d.ts("Agents' streams through a relay", [
        (f'sum by (node) (increase(cloudless_overlay_traversal_attempts_total{{job="agent", method="relay", result="success"}}[{RATE}]))', "{{node}}"),
    ], decimals=0, description="Streams an agent could open only through a relay (its peer could be neither dialed nor punched).")
    d.ts("Service proxy connections", [
        ('sum by (node, listener) (cloudless_agent_proxy_connections{job="agent"})', "{{node}} {{listener}}"),
    ], decimals=0, description="Connections each node's service proxy has accepted and not closed: replicas to service VIPs (vip) and from outside (ingress, every port together); up to 16,384 per pool.")
    d.ts("Connections the proxy closed", [
        (f'sum by (listener, reason) (increase(cloudless_agent_proxy_closed_connections_total{{job="agent"}}[{RATE}]))', "{{listener}} {{reason}}"),
    ], decimals=0, description="Closed as accepted (a source over its most connections or, at ingress, its rate; a full pool) or closed idle; idle_under_pressure means a pool was nearly full.")
    d.ts("UDP datagrams the proxy dropped", [
        (f'sum by (node) (increase(cloudless_agent_proxy_dropped_datagrams_total{{job="agent"}}[{RATE}]))', "{{node}}"),
    ], decimals=0, description="Datagrams to UDP service ports dropped because a flow's queue (256 KiB) or the proxy's (32 MiB) was full: the flow's endpoint (or the overlay to it) is slower than its callers.")
    return d


def secrets():
    d = Dash("cloudless-secrets", "Cloudless / Secrets",
             "Secret reads and refusals, join tokens, certificate expiry.")
    d.ts("Secret reads", [(f'sum by (node) (rate(cloudless_secrets_reads_total{{job="coordinator"}}[{RATE}]))', "{{node}}")],
         unit="ops", core=True)
    d.ts("Secret access tokens issued", [(f'sum by (node) (rate(cloudless_secrets_mints_total{{job="coordinator"}}[{RATE}]))', "{{node}}")],
         unit="ops", core=True)
    d.ts("Secret refusals by reason", [(f'sum by (reason) (rate(cloudless_secrets_refusals_total{{job="coordinator"}}[{RATE}]))', "{{reason}}")],
         unit="ops")
    d.ts("Join tokens used", [(f'sum(increase(cloudless_join_tokens_used_total{{job="coordinator"}}[{RATE}]))', "enrollments")])
    d.ts("Join tokens refused by reason", [(f'sum by (reason) (increase(cloudless_join_tokens_refused_total{{job="coordinator"}}[{RATE}]))', "{{reason}}")])
    d.table("Certificates: time left", [('min by (kind, subject) (cloudless_certificate_expiry_timestamp_seconds{job="coordinator"}) - time()', "")],
            w=24, unit="s", core=True)
    return d


DASHBOARDS = {
    "overview.json": overview,
    "raft.json": raft,
    "scheduler.json": scheduler,
    "nodes.json": nodes,
    "workloads.json": workloads,
    "overlay.json": overlay,
    "secrets.json": secrets,
}


def render():
    return {name: make() for name, make in DASHBOARDS.items()}


def main(argv):
    dashes = render()
    if "--core" in argv:
        for d in dashes.values():
            for title in d.core:
                print(f"{d.uid}\t{title}")
        return 0
    stale = []
    for name, d in dashes.items():
        text = json.dumps(d.json(), indent=2) + "\n"
        path = os.path.join(OUT, name)
        if "--check" in argv:
            try:
                with open(path) as f:
                    if f.read() != text:
                        stale.append(path)
            except FileNotFoundError:
                stale.append(path)
        else:
            os.makedirs(OUT, exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
    if stale:
        print("out of date (run python3 deployments/compose/grafana/dashboards.py): " + ", ".join(stale),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
