//! The leader's reconcile loop: desired replicas (workloads) against actual
//! ones (replica records), placed by the scheduler and committed to Raft.
//!
//! One pass reads the committed state, and commits at most one entry that
//! removes replicas (lost with their node, failed beyond their restart
//! policy, surplus, or replaced by a rollout) and places new ones. Passes run
//! when the state changes and every [`TICK`] otherwise. Agents learn their
//! assignments from the committed records (`WatchAssignments`).

use std::collections::{BTreeMap, HashMap, HashSet};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use crate::metrics::ReasonLabel;
use std::time::Duration;

use cloudless_scheduler::{ClusterSnapshot, Decision};
use cloudless_state::{Command, ReconcileDecision, Rollback, StateReader};
use cloudless_types::{
    EventRecord, NodePhase, NodeRecord, ReplicaRecord, ReplicaState, RolloutStrategy, Workload,
};
use openraft::ServerState;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use crate::handle::CoordinatorHandle;
use crate::scheduler_input::{node_infos, workload_request};

/// Longest wait between passes.
const TICK: Duration = Duration::from_millis(500);

/// What one pass decided.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    /// Replica ids to remove, with an event reason and a message.
    pub remove: Vec<(String, &'static str, &'static str)>,
    /// Replicas to place: (index into the workloads, count).
    pub place: Vec<(usize, usize)>,
    /// Rollouts to undo: (index into the workloads, the previous spec).
    pub rollback: Vec<(usize, cloudless_types::WorkloadSpec)>,
    /// Replicas of Down nodes kept as Unknown (`disconnect.lostAfterSeconds`).
    pub mark_unknown: Vec<String>,
    /// Unknown replicas whose node is back and that stay.
    pub reconnected: Vec<String>,
}

fn is_ready(r: &ReplicaRecord) -> bool {
    matches!(r.state, ReplicaState::Ready | ReplicaState::Succeeded)
}

/// The fewest Ready replicas voluntary removals (rollouts, reconnection)
/// may leave: `replicas - maxUnavailable`, raised to `minAvailable`, at most
/// the desired count.
fn availability_floor(w: &Workload) -> usize {
    let desired = w.spec.replicas as usize;
    let by_unavailable = desired.saturating_sub(w.spec.rollout.max_unavailable as usize);
    let min_available = w.spec.rollout.min_available.unwrap_or(0) as usize;
    by_unavailable.max(min_available).min(desired)
}

/// Decides removals and how many replicas each workload needs, from the
/// committed state alone (deterministic, so it is unit-tested).
pub(crate) fn plan(
    workloads: &[Workload],
    replicas: &[ReplicaRecord],
    nodes: &[NodeRecord],
    now_ms: i64,
) -> Plan {
    let mut plan = Plan::default();
    let down_since: HashMap<&str, i64> = nodes
        .iter()
        .filter(|n| n.phase == NodePhase::Down)
        .map(|n| (n.id.as_str(), n.phase_since_ms))
        .collect();
    let enrolled: HashSet<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
    let draining: HashSet<&str> = nodes
        .iter()
        .filter(|n| n.draining)
        .map(|n| n.id.as_str())
        .collect();
    let known: HashMap<String, &Workload> = workloads
        .iter()
        .map(|w| (format!("{}/{}", w.namespace, w.name), w))
        .collect();
    // With no Ready node at all the control plane is more likely cut off
    // than every device dead at once (and there is nowhere to move to):
    // lost replicas are kept until some node is Ready again.
    let any_ready = nodes.iter().any(|n| n.phase == NodePhase::Ready);
    let mut by_workload: HashMap<String, Vec<&ReplicaRecord>> = HashMap::new();
    let mut reconnected: HashMap<String, Vec<&ReplicaRecord>> = HashMap::new();
    for r in replicas {
        let workload = known.get(&r.workload_key());
        let node_down = r.node_id.as_str();
        if !enrolled.contains(node_down) {
            // `RemoveNode` takes a node's replicas with it; one left over
            // (from state written before it did) is gone all the same.
            plan.remove
                .push((r.id.clone(), "Lost", "its node was removed; replacing it"));
        } else if let (Some(since), true) = (down_since.get(node_down), any_ready) {
            let policy = workload.map_or(r.spec.disconnect, |w| w.spec.disconnect);
            let lost_after_ms = i64::from(policy.lost_after_seconds) * 1000;
            if lost_after_ms == 0 || workload.is_none() {
                plan.remove
                    .push((r.id.clone(), "Lost", "its node is down; replacing it"));
            } else if now_ms - since >= lost_after_ms {
                plan.remove.push((
                    r.id.clone(),
                    "Lost",
                    "its node stayed down beyond disconnect.lostAfterSeconds",
                ));
            } else {
                if r.disconnected_at_ms == 0 {
                    plan.mark_unknown.push(r.id.clone());
                }
                if !policy.replace {
                    // Counted as if running: no replacement.
                    by_workload.entry(r.workload_key()).or_default().push(r);
                }
            }
        } else if workload.is_none() {
            plan.remove
                .push((r.id.clone(), "Deleted", "its workload was deleted"));
        } else if r.state == ReplicaState::Failed {
            plan.remove.push((
                r.id.clone(),
                "Rescheduled",
                "failed beyond its restart policy; placing a new replica",
            ));
        } else {
            if r.disconnected_at_ms > 0 && !down_since.contains_key(node_down) {
                reconnected.entry(r.workload_key()).or_default().push(r);
            }
            by_workload.entry(r.workload_key()).or_default().push(r);
        }
    }
    for (index, w) in workloads.iter().enumerate() {
        let key = format!("{}/{}", w.namespace, w.name);
        let mut mine = by_workload.remove(&key).unwrap_or_default();
        let desired = w.spec.replicas as usize;
        let max_surge = w.spec.rollout.max_surge as usize;
        let floor = availability_floor(w);
        if let Some(back) = reconnected.remove(&key) {
            reconcile_reconnected(w, &back, &mut mine, floor, &mut plan);
        }
        // A replica runs the current template when its spec matches (after
        // a rollback the earlier replicas are current again, not replaced).
        let (mut current, mut old): (Vec<&ReplicaRecord>, Vec<&ReplicaRecord>) = mine
            .into_iter()
            .partition(|r| r.template == w.template || r.spec.same_template(&w.spec));
        // A rollout whose new replicas miss the progress deadline goes back
        // to the newest earlier template that still has replicas.
        let deadline_ms = i64::from(w.spec.rollout.progress_deadline_seconds) * 1000;
        let stuck = current
            .iter()
            .any(|r| !is_ready(r) && now_ms - r.created_at_ms > deadline_ms);
        if stuck {
            if let Some(prev) = old.iter().max_by_key(|r| r.template) {
                let mut spec = prev.spec.clone();
                spec.replicas = w.spec.replicas;
                plan.rollback.push((index, spec));
                continue;
            }
        }
        // Least useful first: not ready, then newest.
        let rank = |r: &&ReplicaRecord| (is_ready(r), std::cmp::Reverse(r.created_at_ms));
        current.sort_by_key(rank);
        old.sort_by_key(rank);
        let ready = |rs: &[&ReplicaRecord]| rs.iter().filter(|r| is_ready(r)).count();
        // Replicas on a draining node are moved: replacements are placed
        // (they do not count towards the desired number), and each one goes
        // once the Ready replicas left without it still meet the floor.
        let (moving, staying): (Vec<&ReplicaRecord>, Vec<&ReplicaRecord>) = current
            .into_iter()
            .partition(|r| draining.contains(r.node_id.as_str()));
        let mut current = staying;
        if current.len() > desired {
            let surplus = current.len() - desired;
            for r in current.drain(..surplus) {
                plan.remove
                    .push((r.id.clone(), "ScaledDown", "surplus replica"));
            }
        }
        let mut ready_total = ready(&current) + ready(&old) + ready(&moving);
        let mut kept_moving = 0;
        for r in &moving {
            let r_ready = usize::from(is_ready(r));
            // One not Ready adds nothing to availability: it goes at once.
            if r_ready == 0 || ready_total - r_ready >= floor {
                plan.remove.push((
                    r.id.clone(),
                    "Drained",
                    "its node is draining; moved to another node",
                ));
                ready_total -= r_ready;
            } else {
                kept_moving += 1;
            }
        }
        let missing = desired.saturating_sub(current.len());
        match w.spec.rollout.strategy {
            RolloutStrategy::RollingUpdate => {}
            RolloutStrategy::Recreate => {
                // Every old replica goes first; new ones once none is left.
                for r in &old {
                    plan.remove.push((
                        r.id.clone(),
                        "Replaced",
                        "Recreate: the old template goes first",
                    ));
                }
                if old.is_empty() && missing > 0 {
                    plan.place.push((index, missing));
                }
                continue;
            }
            RolloutStrategy::BlueGreen => {
                // A full new set next to the old; the old go together once
                // every new replica is Ready.
                if missing > 0 {
                    plan.place.push((index, missing));
                }
                if !old.is_empty() && missing == 0 && ready(&current) >= desired {
                    for r in &old {
                        plan.remove.push((
                            r.id.clone(),
                            "Replaced",
                            "BlueGreen: the new set is Ready",
                        ));
                    }
                }
                continue;
            }
        }
        // Old-template replicas go as long as enough ready ones remain.
        let mut kept_old = 0;
        for r in &old {
            let r_ready = usize::from(is_ready(r));
            if ready_total - r_ready >= floor {
                plan.remove.push((
                    r.id.clone(),
                    "Replaced",
                    "an older template, replaced by the rollout",
                ));
                ready_total -= r_ready;
            } else {
                kept_old += 1;
            }
        }
        // Replicas held back by the floor (old template or draining) leave
        // room for `maxSurge` replacements above the desired count.
        let budget = if kept_old == 0 && kept_moving == 0 {
            missing
        } else {
            (desired + max_surge).saturating_sub(current.len() + kept_old + kept_moving)
        };
        let n = missing.min(budget);
        if n > 0 {
            plan.place.push((index, n));
        }
    }
    plan
}

/// Replicas whose node came back within `disconnect.lostAfterSeconds`,
/// next to the replacements placed meanwhile: `disconnect.reconcile` picks
/// which copies stay (never dropping Ready replicas below `floor`). Removed
/// ones leave `mine`; the returning ones that stay are cleared of Unknown.
fn reconcile_reconnected<'a>(
    w: &Workload,
    back: &[&'a ReplicaRecord],
    mine: &mut Vec<&'a ReplicaRecord>,
    floor: usize,
    plan: &mut Plan,
) {
    use cloudless_types::ReconnectPolicy;
    let desired = w.spec.replicas as usize;
    let surplus = mine.len().saturating_sub(desired);
    let is_back = |r: &ReplicaRecord| back.iter().any(|b| b.id == r.id);
    // Candidates for removal, first to go first.
    let mut order: Vec<&ReplicaRecord> = match w.spec.disconnect.reconcile {
        ReconnectPolicy::KeepReplacement => back.to_vec(),
        ReconnectPolicy::KeepOriginal => {
            let mut v: Vec<&ReplicaRecord> = mine.iter().copied().filter(|r| !is_back(r)).collect();
            // Newest (the replacements) first.
            v.sort_by_key(|r| std::cmp::Reverse(r.created_at_ms));
            v
        }
        ReconnectPolicy::BestScore => {
            let mut v = mine.clone();
            v.sort_by(|a, b| {
                a.score
                    .total_cmp(&b.score)
                    .then(b.created_at_ms.cmp(&a.created_at_ms))
            });
            v
        }
    };
    order.truncate(surplus);
    let mut ready_total = mine.iter().filter(|r| is_ready(r)).count();
    let mut gone: HashSet<&str> = HashSet::new();
    // Removals the floor holds back wait for the next pass: they are not
    // counted now (so nothing else is scaled down in their place) and the
    // returning replicas stay Unknown until it is settled.
    let mut blocked: HashSet<&str> = HashSet::new();
    for r in order {
        let r_ready = usize::from(is_ready(r));
        if ready_total - r_ready < floor {
            blocked.insert(r.id.as_str());
            continue;
        }
        ready_total -= r_ready;
        gone.insert(r.id.as_str());
        plan.remove.push((
            r.id.clone(),
            "Reconciled",
            if is_back(r) {
                "its node came back; the replacement stays (disconnect.reconcile)"
            } else {
                "the original's node came back and keeps it (disconnect.reconcile)"
            },
        ));
    }
    mine.retain(|r| !gone.contains(r.id.as_str()) && !blocked.contains(r.id.as_str()));
    if blocked.is_empty() {
        for b in back {
            if !gone.contains(b.id.as_str()) {
                plan.reconnected.push(b.id.clone());
            }
        }
    }
}

fn replica_id(w: &Workload) -> String {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!(
        "{}.{}-{}-{}",
        w.namespace,
        w.name,
        w.template,
        suffix.get(..8).unwrap_or(&suffix)
    )
}

/// Where one pass's new replicas go.
#[derive(Debug, Default)]
pub(crate) struct Placements {
    /// New replicas, Pending on their node.
    pub placed: Vec<ReplicaRecord>,
    /// Replicas to stop to make room for a replica of a workload at least 10
    /// higher in priority: (victim replica id, the preempting workload's
    /// `namespace/name`). Their workloads get replacements in a later pass.
    pub preempted: Vec<(String, String)>,
    /// Workloads (index) with replicas no node can take, and why.
    pub unplaced: Vec<(usize, String)>,
    /// What the scheduler did, for its metrics.
    pub stats: ScheduleStats,
}

/// One pass's scheduling, counted: replicas placed, replicas no node could
/// take by their most common reason, and the time the scheduler took.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct ScheduleStats {
    pub placed: u64,
    pub unplaced: BTreeMap<&'static str, u64>,
    pub seconds: f64,
}

/// Places the replicas `plan` asks for on `nodes`, which hold `remaining`
/// (the replicas left after the plan's removals). Pure but for the random
/// suffix of new replica ids.
pub(crate) fn schedule(
    plan: &Plan,
    workloads: &[Workload],
    nodes: &[NodeRecord],
    remaining: &[ReplicaRecord],
    weights: cloudless_types::SchedulerWeights,
    now_ms: i64,
) -> Result<Placements, crate::error::CoordinatorError> {
    let mut out = Placements::default();
    if plan.place.is_empty() {
        return Ok(out);
    }
    let started = std::time::Instant::now();
    // Every replica this snapshot placed, in order: the scheduler names one
    // it evicts again `<workload>#<n>`, n counting its placements from 1.
    let mut placed: Vec<Option<ReplicaRecord>> = Vec::new();
    let infos = node_infos(nodes, remaining);
    let mut snapshot = ClusterSnapshot::new(&infos, weights)
        .map_err(|e| crate::error::CoordinatorError::Fatal(format!("scheduler input: {e}")))?;
    for (index, count) in &plan.place {
        let w = &workloads[*index];
        let key = format!("{}/{}", w.namespace, w.name);
        let req = workload_request(w, *count);
        let decisions = match snapshot.place(&req, now_ms, false) {
            Ok(d) => d,
            Err(e) => {
                *out.stats.unplaced.entry("invalid_request").or_default() += *count as u64;
                out.unplaced.push((*index, e.to_string()));
                continue;
            }
        };
        for d in decisions {
            match d {
                Decision::Placed(p) => {
                    for victim in p.preempted {
                        // A victim placed earlier in this same pass is not
                        // in the state yet: it is simply not placed.
                        let earlier = victim
                            .rsplit_once('#')
                            .and_then(|(_, n)| n.parse::<usize>().ok())
                            .and_then(|n| placed.get_mut(n.checked_sub(1)?));
                        match earlier {
                            Some(slot) => *slot = None,
                            None => out.preempted.push((victim, key.clone())),
                        }
                    }
                    placed.push(Some(ReplicaRecord {
                        id: replica_id(w),
                        namespace: w.namespace.clone(),
                        workload: w.name.clone(),
                        template: w.template,
                        spec: w.spec.clone(),
                        node_id: p.node,
                        state: ReplicaState::Pending,
                        exit_code: None,
                        restarts: 0,
                        message: String::new(),
                        created_at_ms: 0,
                        updated_at_ms: 0,
                        ready_at_ms: 0,
                        disconnected_at_ms: 0,
                        score: p.score,
                        address: String::new(),
                        trace: String::new(),
                    }));
                }
                Decision::Unplaced(u) => {
                    // A reason that removed no node: there was none.
                    let reason = u
                        .reasons
                        .first()
                        .filter(|r| r.1 > 0)
                        .map_or("no_nodes", |r| r.0.label());
                    *out.stats.unplaced.entry(reason).or_default() += 1;
                    out.unplaced.push((*index, u.to_string()));
                }
            }
        }
    }
    out.placed = placed.into_iter().flatten().collect();
    out.stats.placed = out.placed.len() as u64;
    out.stats.seconds = started.elapsed().as_secs_f64();
    Ok(out)
}

/// Runs passes while this coordinator leads, until `cancel`.
/// The reconcile loop's metrics (docs/metrics.md).
#[derive(Debug, Clone)]
pub(crate) struct ReconcileMetrics {
    passes: prometheus_client::metrics::counter::Counter,
    decisions: prometheus_client::metrics::counter::Counter,
    entries: prometheus_client::metrics::counter::Counter,
    seconds: prometheus_client::metrics::histogram::Histogram,
    scheduled: Family<ResultLabel, Counter>,
    schedule_seconds: Histogram,
    unplaced: Family<ReasonLabel, Gauge>,
}

/// Why replicas wait besides the scheduler's filters: no node at all, or a
/// request the scheduler refused.
const UNPLACED_REASONS: [&str; 2] = ["no_nodes", "invalid_request"];

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

impl ReconcileMetrics {
    /// Records one pass's scheduling; `None` when this coordinator does not
    /// lead (then it has no unplaced replicas to report).
    fn scheduled(&self, stats: Option<&ScheduleStats>) {
        // Every reason is exported, at 0 when no replica waits for it.
        for reason in UNPLACED_REASONS
            .iter()
            .copied()
            .chain(cloudless_scheduler::FilterReason::ALL.map(|r| r.label()))
        {
            let n = stats.and_then(|s| s.unplaced.get(reason)).copied();
            self.unplaced
                .get_or_create(&ReasonLabel { reason })
                .set(n.map_or(0, |n| i64::try_from(n).unwrap_or(i64::MAX)));
        }
        let Some(stats) = stats else {
            return;
        };
        if stats.placed > 0 || !stats.unplaced.is_empty() {
            self.schedule_seconds.observe(stats.seconds);
        }
        self.scheduled
            .get_or_create(&ResultLabel { result: "placed" })
            .inc_by(stats.placed);
        let unplaced: u64 = stats.unplaced.values().sum();
        self.scheduled
            .get_or_create(&ResultLabel { result: "unplaced" })
            .inc_by(unplaced);
    }
}

impl ReconcileMetrics {
    /// Registers every metric in `registry`.
    pub(crate) fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let m = Self {
            passes: Default::default(),
            decisions: Default::default(),
            entries: Default::default(),
            seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.000_1, 2.0, 16),
            ),
            scheduled: Family::default(),
            schedule_seconds: Histogram::new(exponential_buckets(0.000_01, 2.0, 20)),
            unplaced: Family::default(),
        };
        m.scheduled(None);
        for result in ["placed", "unplaced"] {
            let _ = m.scheduled.get_or_create(&ResultLabel { result });
        }
        let s = registry.sub_registry_with_prefix("cloudless_scheduler");
        s.register(
            "decisions",
            "Placements the scheduler attempted as leader, by result (placed; unplaced, counted at every pass a replica waits)",
            m.scheduled.clone(),
        );
        s.register_with_unit(
            "decision",
            "Time the scheduler took for one reconcile pass's new replicas",
            prometheus_client::registry::Unit::Seconds,
            m.schedule_seconds.clone(),
        );
        s.register(
            "unplaced_replicas",
            "Replicas no node could take in the last pass, by the most common reason",
            m.unplaced.clone(),
        );
        let r = registry.sub_registry_with_prefix("cloudless_reconcile");
        r.register(
            "passes",
            "Reconcile passes run by this coordinator as leader",
            m.passes.clone(),
        );
        r.register(
            "decisions",
            "Passes that decided something and committed it",
            m.decisions.clone(),
        );
        r.register(
            "raft_entries",
            "Raft commands reconcile passes committed (one per decision unless it was split)",
            m.entries.clone(),
        );
        r.register(
            "pass_seconds",
            "Time of one pass: read, decide and commit",
            m.seconds.clone(),
        );
        m
    }
}

pub(crate) async fn run(
    handle: CoordinatorHandle,
    metrics: ReconcileMetrics,
    cancel: CancellationToken,
) {
    let reader = handle.reader().clone();
    let mut changes = reader.changes();
    let mut unplaced_logged: HashMap<String, u64> = HashMap::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(TICK) => {}
            r = changes.changed() => if r.is_err() { return },
        }
        let leading = handle.raft().metrics().borrow().state == ServerState::Leader;
        if !leading {
            metrics.scheduled(None);
            continue;
        }
        // Debounce: let a burst of commits settle into one pass.
        tokio::time::sleep(Duration::from_millis(20)).await;
        changes.borrow_and_update();
        let started = std::time::Instant::now();
        metrics.passes.inc();
        match pass(&handle, &reader, &mut unplaced_logged, &metrics).await {
            Ok(0) => {}
            Ok(entries) => {
                metrics.decisions.inc();
                metrics.entries.inc_by(entries);
            }
            Err(e) => tracing::warn!(error = %e, "reconcile pass failed; retrying"),
        }
        metrics.seconds.observe(started.elapsed().as_secs_f64());
    }
}

async fn pass(
    handle: &CoordinatorHandle,
    reader: &StateReader,
    unplaced_logged: &mut HashMap<String, u64>,
    metrics: &ReconcileMetrics,
) -> Result<u64, crate::error::CoordinatorError> {
    let cluster = handle.cluster()?;
    let workloads = reader.workloads(None)?;
    let replicas = reader.replicas()?;
    let nodes = reader.nodes()?;
    let mut entries = 0;
    if let Some(assign) = crate::node_subnets::assign_missing(&nodes, &cluster.config.network) {
        if let Command::AssignNodeSubnets { node_ids } = &assign {
            tracing::info!(
                nodes = node_ids.len(),
                "giving replica subnets to nodes enrolled before subnets existed"
            );
        }
        handle.write(None, assign).await?;
        entries += 1;
    }
    if let Some(assign) = crate::service_vips::assign_missing(&workloads, &cluster.config.network) {
        if let Command::AssignServiceVips { workloads } = &assign {
            tracing::info!(
                workloads = workloads.len(),
                "giving service VIPs to workloads stored before services existed"
            );
        }
        handle.write(None, assign).await?;
        entries += 1;
    }
    let (mut decision, unplaced, stats) = decide(
        &workloads,
        &replicas,
        &nodes,
        cluster.config.scheduler_weights,
        now_ms(),
    )?;
    metrics.scheduled(Some(&stats));
    for (index, reasons) in unplaced {
        let w = &workloads[index];
        let key = format!("{}/{}", w.namespace, w.name);
        // Once per workload generation, not every pass.
        if unplaced_logged.insert(key.clone(), w.generation) != Some(w.generation) {
            tracing::warn!(workload = %key, reasons = %reasons, "replica cannot be placed");
        }
    }
    if decision.is_empty() {
        return Ok(entries);
    }
    for e in &decision.events {
        tracing::info!(workload = %format!("{}/{}", e.namespace, e.object), reason = %e.reason, "{}", e.message);
    }
    // Open until the decision is committed: the agents' spans of starting
    // each new replica join its trace.
    let _placing = placement_spans(&mut decision.place);
    let budget = handle.part_bytes();
    for part in split_decision(decision, budget) {
        handle.write(None, Command::Reconcile(part)).await?;
        entries += 1;
    }
    Ok(entries)
}

/// One span per workload given replicas in a pass (a trace of its own,
/// `cloudless.reconciler/Place`), its context stored in each new replica's
/// `trace` so the agent that runs it continues that trace. The spans end
/// when dropped. Nothing is stored while traces are not exported.
fn placement_spans(placed: &mut [ReplicaRecord]) -> Vec<tracing::Span> {
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for r in placed.iter() {
        *counts
            .entry((r.namespace.clone(), r.workload.clone()))
            .or_default() += 1;
    }
    let spans: BTreeMap<(String, String), tracing::Span> = counts
        .into_iter()
        .map(|((namespace, workload), n)| {
            let span = tracing::info_span!(
                parent: None,
                "place",
                otel.name = "cloudless.reconciler/Place",
                workload = %format!("{namespace}/{workload}"),
                replicas = n,
            );
            ((namespace, workload), span)
        })
        .collect();
    for r in placed.iter_mut() {
        if let Some(span) = spans.get(&(r.namespace.clone(), r.workload.clone())) {
            r.trace = cloudless_telemetry::traceparent(span);
        }
    }
    spans.into_values().collect()
}

/// The whole decision of one pass over the applied state at `now_ms`: what
/// to roll back, mark Unknown, remove, place and clear, with an event for
/// each, and the workloads (index) with replicas no node can take. Pure but
/// for the random suffix of new replica ids.
/// A pass's decision, the workloads (index) with replicas no node can take
/// and why, and what the scheduler did.
pub(crate) type Decided = (ReconcileDecision, Vec<(usize, String)>, ScheduleStats);

pub(crate) fn decide(
    workloads: &[Workload],
    replicas: &[ReplicaRecord],
    nodes: &[NodeRecord],
    weights: cloudless_types::SchedulerWeights,
    now_ms: i64,
) -> Result<Decided, crate::error::CoordinatorError> {
    let plan = plan(workloads, replicas, nodes, now_ms);
    let mut d = ReconcileDecision::default();
    let event = |namespace: &str, object: &str, reason: &str, message: String| EventRecord {
        at_ms: 0,
        kind: "Workload".into(),
        namespace: namespace.to_owned(),
        object: object.to_owned(),
        reason: reason.to_owned(),
        message,
    };
    let node_name = |id: &str| {
        nodes
            .iter()
            .find(|n| n.id == id)
            .map_or_else(|| id.to_owned(), |n| n.name.clone())
    };
    let find = |id: &str| replicas.iter().find(|r| r.id == id);
    for (index, spec) in &plan.rollback {
        let w = &workloads[*index];
        d.events.push(event(
            &w.namespace,
            &w.name,
            "RolledBack",
            format!(
                "new replicas were not Ready within {} s; back to the previous template (image {})",
                w.spec.rollout.progress_deadline_seconds, spec.image
            ),
        ));
        d.rollbacks.push(Rollback {
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            from_template: w.template,
            spec: spec.clone(),
        });
    }
    for id in &plan.mark_unknown {
        if let Some(r) = find(id) {
            let w = workloads
                .iter()
                .find(|w| w.namespace == r.namespace && w.name == r.workload);
            let disconnect = w.map_or(r.spec.disconnect, |w| w.spec.disconnect);
            d.events.push(event(
                &r.namespace,
                &r.workload,
                "Unknown",
                format!(
                    "replica {id} on {}: its node is down; kept for up to {} s (disconnect.lostAfterSeconds){}",
                    node_name(&r.node_id),
                    disconnect.lost_after_seconds,
                    if disconnect.replace { ", a replacement is placed meanwhile" } else { "" }
                ),
            ));
        }
    }
    d.mark_unknown.clone_from(&plan.mark_unknown);
    let removed: HashSet<&str> = plan.remove.iter().map(|(id, _, _)| id.as_str()).collect();
    let remaining: Vec<ReplicaRecord> = replicas
        .iter()
        .filter(|r| !removed.contains(r.id.as_str()))
        .cloned()
        .collect();
    let Placements {
        placed,
        preempted,
        unplaced,
        stats,
    } = schedule(&plan, workloads, nodes, &remaining, weights, now_ms)?;
    for (id, reason, why) in &plan.remove {
        if let Some(r) = find(id) {
            d.events.push(event(
                &r.namespace,
                &r.workload,
                reason,
                format!("replica {id} on {}: {why}", node_name(&r.node_id)),
            ));
        }
        d.remove.push(id.clone());
    }
    for (victim, by) in preempted {
        if let Some(r) = find(&victim) {
            let priority = workloads
                .iter()
                .find(|w| format!("{}/{}", w.namespace, w.name) == by)
                .map_or(0, |w| w.spec.priority);
            d.events.push(event(
                &r.namespace,
                &r.workload,
                "Preempted",
                format!(
                    "replica {victim} on {}: stopped to make room for {by} (priority {priority} is at least 10 higher); a replacement is placed elsewhere",
                    node_name(&r.node_id),
                ),
            ));
        }
        // Removed in the same decision as the replicas taking their place.
        d.remove.push(victim);
    }
    for r in &placed {
        d.events.push(event(
            &r.namespace,
            &r.workload,
            "Scheduled",
            format!("replica {} on {}", r.id, node_name(&r.node_id)),
        ));
    }
    d.place = placed;
    for id in &plan.reconnected {
        if let Some(r) = find(id) {
            d.events.push(event(
                &r.namespace,
                &r.workload,
                "Reconnected",
                format!(
                    "replica {id} on {}: its node is back and the replica stays",
                    node_name(&r.node_id)
                ),
            ));
        }
    }
    d.clear_unknown.clone_from(&plan.reconnected);
    Ok((d, unplaced, stats))
}

/// `d` as one command when it fits `budget` bytes (the usual case), else as
/// consecutive commands each holding a slice of one part, in the order the
/// state machine applies the parts.
fn split_decision(d: ReconcileDecision, budget: usize) -> Vec<ReconcileDecision> {
    if postcard::experimental::serialized_size(&d).is_ok_and(|n| n <= budget) {
        return vec![d];
    }
    /// `items` in parts of at most `budget` bytes, each part its own decision.
    fn parts<T: serde::Serialize>(
        items: Vec<T>,
        budget: usize,
        part: fn(Vec<T>) -> ReconcileDecision,
    ) -> impl Iterator<Item = ReconcileDecision> {
        crate::proposer::split_by_size(items, usize::MAX, budget)
            .into_iter()
            .map(part)
    }
    parts(d.rollbacks, budget, |rollbacks| ReconcileDecision {
        rollbacks,
        ..ReconcileDecision::default()
    })
    .chain(parts(d.mark_unknown, budget, |mark_unknown| {
        ReconcileDecision {
            mark_unknown,
            ..ReconcileDecision::default()
        }
    }))
    .chain(parts(d.remove, budget, |remove| ReconcileDecision {
        remove,
        ..ReconcileDecision::default()
    }))
    .chain(parts(d.place, budget, |place| ReconcileDecision {
        place,
        ..ReconcileDecision::default()
    }))
    .chain(parts(d.clear_unknown, budget, |clear_unknown| {
        ReconcileDecision {
            clear_unknown,
            ..ReconcileDecision::default()
        }
    }))
    .chain(parts(d.events, budget, |events| ReconcileDecision {
        events,
        ..ReconcileDecision::default()
    }))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudless_types::WorkloadSpec;

    fn workload(replicas: u32, template: u64) -> Workload {
        Workload {
            namespace: "default".into(),
            name: "web".into(),
            spec: WorkloadSpec {
                image: "busybox".into(),
                replicas,
                ..WorkloadSpec::default()
            },
            generation: template,
            created_at_ms: 0,
            updated_at_ms: 0,
            template,
            revisions: Vec::new(),
            vip: None,
        }
    }

    fn node(id: &str, phase: NodePhase) -> NodeRecord {
        let mut n = NodeRecord::new(id.into(), id.into(), "t".into(), 0);
        n.phase = phase;
        n
    }

    fn replica(id: &str, node: &str, template: u64, state: ReplicaState) -> ReplicaRecord {
        ReplicaRecord {
            id: id.into(),
            namespace: "default".into(),
            workload: "web".into(),
            template,
            spec: WorkloadSpec::default(),
            node_id: node.into(),
            state,
            exit_code: None,
            restarts: 0,
            message: String::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
            ready_at_ms: 0,
            disconnected_at_ms: 0,
            score: 0.0,
            address: String::new(),
            trace: String::new(),
        }
    }

    fn removed(p: &Plan) -> Vec<&str> {
        let mut v: Vec<&str> = p.remove.iter().map(|(id, _, _)| id.as_str()).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn places_missing_replicas_and_replaces_lost_and_failed_ones() {
        let nodes = [node("a", NodePhase::Ready), node("b", NodePhase::Down)];
        let replicas = [
            replica("r1", "a", 1, ReplicaState::Ready),
            replica("r2", "b", 1, ReplicaState::Ready),
            replica("r3", "a", 1, ReplicaState::Failed),
        ];
        let p = plan(&[workload(3, 1)], &replicas, &nodes, 0);
        assert_eq!(removed(&p), ["r2", "r3"]);
        assert_eq!(p.place, [(0, 2)]);
        // Every node down: nothing is declared lost.
        let all_down = [node("a", NodePhase::Down), node("b", NodePhase::Down)];
        let p = plan(&[workload(3, 1)], &replicas[..2], &all_down, 0);
        assert!(p.remove.is_empty(), "{:?}", p.remove);
    }

    #[test]
    fn scales_down_the_least_useful_first() {
        let nodes = [node("a", NodePhase::Ready)];
        let replicas = [
            replica("ready", "a", 1, ReplicaState::Ready),
            replica("pending", "a", 1, ReplicaState::Pending),
        ];
        let p = plan(&[workload(1, 1)], &replicas, &nodes, 0);
        assert_eq!(removed(&p), ["pending"]);
        assert!(p.place.is_empty());
        // A deleted workload's replicas go.
        let p = plan(&[], &replicas, &nodes, 0);
        assert_eq!(removed(&p), ["pending", "ready"]);
    }

    #[test]
    fn rolling_update_surges_by_one_and_keeps_ready_replicas_until_replaced() {
        let nodes = [node("a", NodePhase::Ready)];
        let old = [
            replica("o1", "a", 1, ReplicaState::Ready),
            replica("o2", "a", 1, ReplicaState::Ready),
        ];
        // Start: one new replica above the desired two, nothing removed.
        let p = plan(&[workload(2, 2)], &old, &nodes, 0);
        assert!(p.remove.is_empty(), "{:?}", p.remove);
        assert_eq!(p.place, [(0, 1)]);
        // The new one is running but not ready: still nothing removed.
        let mut state = old.to_vec();
        state.push(replica("n1", "a", 2, ReplicaState::Running));
        let p = plan(&[workload(2, 2)], &state, &nodes, 0);
        assert!(p.remove.is_empty() && p.place.is_empty(), "{p:?}");
        // Ready: one old goes, and the next new one is placed.
        state[2].state = ReplicaState::Ready;
        let p = plan(&[workload(2, 2)], &state, &nodes, 0);
        assert_eq!(p.remove.len(), 1);
        assert_eq!(p.place, [(0, 1)]);
        // Both new ready: the last old goes.
        let state = [
            replica("o2", "a", 1, ReplicaState::Ready),
            replica("n1", "a", 2, ReplicaState::Ready),
            replica("n2", "a", 2, ReplicaState::Ready),
        ];
        let p = plan(&[workload(2, 2)], &state, &nodes, 0);
        assert_eq!(removed(&p), ["o2"]);
        assert!(p.place.is_empty());
    }

    #[test]
    fn recreate_removes_the_old_first_and_blue_green_switches_when_all_new_are_ready() {
        let nodes = [node("a", NodePhase::Ready)];
        let old = [
            replica("o1", "a", 1, ReplicaState::Ready),
            replica("o2", "a", 1, ReplicaState::Ready),
        ];
        let mut w = workload(2, 2);
        w.spec.image = "busybox:2".into();
        w.spec.rollout.strategy = RolloutStrategy::Recreate;
        let p = plan(&[w.clone()], &old, &nodes, 0);
        assert_eq!(removed(&p), ["o1", "o2"]);
        assert!(p.place.is_empty(), "nothing new while old ones exist");
        let p = plan(&[w.clone()], &[], &nodes, 0);
        assert_eq!(p.place, [(0, 2)]);

        w.spec.rollout.strategy = RolloutStrategy::BlueGreen;
        let p = plan(&[w.clone()], &old, &nodes, 0);
        assert!(p.remove.is_empty());
        assert_eq!(p.place, [(0, 2)], "a full new set at once");
        let mut state = old.to_vec();
        let mut n1 = replica("n1", "a", 2, ReplicaState::Ready);
        n1.spec = w.spec.clone();
        let mut n2 = replica("n2", "a", 2, ReplicaState::Running);
        n2.spec = w.spec.clone();
        state.extend([n1, n2]);
        let p = plan(&[w.clone()], &state, &nodes, 0);
        assert!(p.remove.is_empty() && p.place.is_empty(), "{p:?}");
        state[3].state = ReplicaState::Ready;
        let p = plan(&[w], &state, &nodes, 0);
        assert_eq!(removed(&p), ["o1", "o2"]);
    }

    #[test]
    fn a_new_template_not_ready_by_the_deadline_rolls_back() {
        let nodes = [node("a", NodePhase::Ready)];
        let mut w = workload(2, 2);
        w.spec.image = "busybox:2".into();
        w.spec.rollout.progress_deadline_seconds = 5;
        let mut old = replica("o1", "a", 1, ReplicaState::Ready);
        old.spec.image = "busybox:1".into();
        let mut new = replica("n1", "a", 2, ReplicaState::Running);
        new.spec = w.spec.clone();
        new.created_at_ms = 1_000;
        let mut o2 = old.clone();
        o2.id = "o2".into();
        let state = [old.clone(), o2, new];
        // Within the deadline: keep waiting.
        assert!(plan(&[w.clone()], &state, &nodes, 5_000)
            .rollback
            .is_empty());
        // Past it: back to the previous spec, with the current replica count.
        let p = plan(&[w.clone()], &state, &nodes, 7_000);
        assert_eq!(p.rollback.len(), 1);
        assert_eq!(p.rollback[0].1.image, "busybox:1");
        assert_eq!(p.rollback[0].1.replicas, 2);
        // After the rollback (template 3 = the old spec) the old replicas are
        // current and the failed new one goes.
        let mut back = w.clone();
        back.template = 3;
        back.spec = old.spec.clone();
        back.spec.replicas = 2;
        let p = plan(&[back], &state, &nodes, 7_000);
        assert_eq!(removed(&p), ["n1"]);
        assert!(p.place.is_empty() && p.rollback.is_empty(), "{p:?}");
    }

    fn down_since(id: &str, since_ms: i64) -> NodeRecord {
        let mut n = node(id, NodePhase::Down);
        n.phase_since_ms = since_ms;
        n
    }

    fn with_disconnect(
        mut w: Workload,
        lost_after_seconds: u32,
        reconcile: cloudless_types::ReconnectPolicy,
    ) -> Workload {
        w.spec.disconnect.lost_after_seconds = lost_after_seconds;
        w.spec.disconnect.reconcile = reconcile;
        w
    }

    #[test]
    fn a_down_nodes_replicas_stay_unknown_until_lost_after_then_go() {
        use cloudless_types::ReconnectPolicy::KeepOriginal;
        let w = with_disconnect(workload(2, 1), 60, KeepOriginal);
        let nodes = [node("a", NodePhase::Ready), down_since("b", 10_000)];
        let replicas = [
            replica("r1", "a", 1, ReplicaState::Ready),
            replica("r2", "b", 1, ReplicaState::Ready),
        ];
        // 30 s down: Unknown, not removed, and a replacement is placed.
        let p = plan(std::slice::from_ref(&w), &replicas, &nodes, 40_000);
        assert!(p.remove.is_empty(), "{:?}", p.remove);
        assert_eq!(p.mark_unknown, ["r2"]);
        assert_eq!(p.place, [(0, 1)]);
        // Already marked: not marked again.
        let mut marked = replicas.clone();
        marked[1].disconnected_at_ms = 10_500;
        let p = plan(std::slice::from_ref(&w), &marked, &nodes, 40_000);
        assert!(p.mark_unknown.is_empty());
        // replace: false keeps counting it, so nothing is placed.
        let mut no_replace = w.clone();
        no_replace.spec.disconnect.replace = false;
        let p = plan(&[no_replace], &marked, &nodes, 40_000);
        assert!(p.place.is_empty() && p.remove.is_empty(), "{p:?}");
        // Past lostAfterSeconds: Lost.
        let p = plan(&[w], &marked, &nodes, 70_001);
        assert_eq!(removed(&p), ["r2"]);
        assert_eq!(p.remove[0].1, "Lost");
        // Without a disconnect block: Lost at once.
        let p = plan(&[workload(2, 1)], &replicas, &nodes, 10_001);
        assert_eq!(removed(&p), ["r2"]);
    }

    #[test]
    fn a_returning_node_is_reconciled_by_policy_within_the_availability_floor() {
        use cloudless_types::ReconnectPolicy::{BestScore, KeepOriginal, KeepReplacement};
        let nodes = [node("a", NodePhase::Ready), node("b", NodePhase::Ready)];
        let mut original = replica("orig", "b", 1, ReplicaState::Ready);
        original.disconnected_at_ms = 5_000;
        original.created_at_ms = 1_000;
        original.score = 40.0;
        let mut replacement = replica("repl", "a", 1, ReplicaState::Ready);
        replacement.created_at_ms = 6_000;
        replacement.score = 70.0;
        let state = [original.clone(), replacement.clone()];

        let p = plan(
            &[with_disconnect(workload(1, 1), 60, KeepOriginal)],
            &state,
            &nodes,
            9_000,
        );
        assert_eq!(removed(&p), ["repl"]);
        assert_eq!(p.reconnected, ["orig"]);
        assert!(p.place.is_empty());

        let p = plan(
            &[with_disconnect(workload(1, 1), 60, KeepReplacement)],
            &state,
            &nodes,
            9_000,
        );
        assert_eq!(removed(&p), ["orig"]);
        assert!(p.reconnected.is_empty());

        let p = plan(
            &[with_disconnect(workload(1, 1), 60, BestScore)],
            &state,
            &nodes,
            9_000,
        );
        assert_eq!(removed(&p), ["orig"], "the replacement scored higher");

        // The replacement is not Ready yet: removing the Ready original
        // would leave none, so it waits (still Unknown, nothing else goes).
        let mut pending = replacement.clone();
        pending.state = ReplicaState::Pending;
        let p = plan(
            &[with_disconnect(workload(1, 1), 60, KeepReplacement)],
            &[original.clone(), pending],
            &nodes,
            9_000,
        );
        assert!(p.remove.is_empty(), "{:?}", p.remove);
        assert!(p.reconnected.is_empty() && p.place.is_empty(), "{p:?}");

        // No surplus (the replacement could not be placed): the original
        // simply stays.
        let p = plan(
            &[with_disconnect(workload(1, 1), 60, KeepReplacement)],
            &[original],
            &nodes,
            9_000,
        );
        assert!(p.remove.is_empty());
        assert_eq!(p.reconnected, ["orig"]);
    }

    #[test]
    fn min_available_holds_old_replicas_a_rolling_update_could_otherwise_drop() {
        let nodes = [node("a", NodePhase::Ready)];
        let mut w = workload(3, 2);
        w.spec.image = "busybox:2".into();
        w.spec.rollout.max_unavailable = 1;
        w.spec.rollout.max_surge = 0;
        let mut old: Vec<ReplicaRecord> = ["o1", "o2", "o3"]
            .iter()
            .map(|id| replica(id, "a", 1, ReplicaState::Ready))
            .collect();
        for r in &mut old {
            r.spec.image = "busybox:1".into();
        }
        // maxUnavailable 1: one old replica may go at once.
        let p = plan(&[w.clone()], &old, &nodes, 0);
        assert_eq!(p.remove.len(), 1, "{:?}", p.remove);
        // minAvailable 3 overrides: none goes before a new one is Ready
        // (with maxSurge 0 nothing could progress, which validation
        // refuses), so the new replica comes first.
        w.spec.rollout.min_available = Some(3);
        w.spec.rollout.max_surge = 1;
        let p = plan(&[w.clone()], &old, &nodes, 0);
        assert!(p.remove.is_empty(), "{:?}", p.remove);
        assert_eq!(p.place, [(0, 1)]);
        assert_eq!(availability_floor(&w), 3);
        w.spec.rollout.min_available = Some(9);
        assert_eq!(availability_floor(&w), 3, "never above the desired count");
    }

    fn ready_with(id: &str, cpu_millis: u64, trusted_cpu_millis: u64) -> NodeRecord {
        let mut n = node(id, NodePhase::Ready);
        let gib = 1 << 30;
        n.status.capacity = cloudless_types::Resources {
            cpu_millis,
            memory_bytes: 4 * gib,
            ..Default::default()
        };
        n.trusted_capacity = cloudless_types::Resources {
            cpu_millis: trusted_cpu_millis,
            memory_bytes: 4 * gib,
            ..Default::default()
        };
        n
    }

    /// One pass: the plan, then where its replicas go.
    fn pass_of(
        workloads: &[Workload],
        replicas: &[ReplicaRecord],
        nodes: &[NodeRecord],
    ) -> (Plan, Placements) {
        let p = plan(workloads, replicas, nodes, 1_000);
        let removed: HashSet<&str> = p.remove.iter().map(|(id, _, _)| id.as_str()).collect();
        let remaining: Vec<ReplicaRecord> = replicas
            .iter()
            .filter(|r| !removed.contains(r.id.as_str()))
            .cloned()
            .collect();
        let placements = schedule(
            &p,
            workloads,
            nodes,
            &remaining,
            cloudless_types::SchedulerWeights::default(),
            1_000,
        )
        .expect("schedule");
        (p, placements)
    }

    #[test]
    fn a_high_priority_replica_on_a_full_node_stops_a_low_one_which_is_replaced_elsewhere() {
        let cpu = |w: &mut Workload, millis: u64, priority: i32| {
            w.spec.requests.cpu_millis = millis;
            w.spec.priority = priority;
        };
        let mut batch = workload(1, 1);
        batch.name = "batch".into();
        cpu(&mut batch, 3000, 0);
        let mut db = workload(1, 1);
        db.name = "db".into();
        cpu(&mut db, 3000, 100);
        let mut low = replica("default.batch-1-aaaaaaaa", "a", 1, ReplicaState::Ready);
        low.workload = "batch".into();
        low.spec = batch.spec.clone();
        // Node a, the only one, is full with the batch replica.
        let nodes = [ready_with("a", 4000, 4000)];
        let workloads = [batch.clone(), db.clone()];
        let (_, first) = pass_of(&workloads, std::slice::from_ref(&low), &nodes);
        assert_eq!(first.placed.len(), 1, "{first:?}");
        assert_eq!(first.placed[0].workload, "db");
        assert_eq!(first.placed[0].node_id, "a");
        assert_eq!(
            first.preempted,
            [(low.id.clone(), "default/db".to_owned())],
            "the high-priority replica was placed on a full node without stopping anyone"
        );

        // Next pass: the victim is gone from the state, the batch workload
        // is one short, and a node with room takes its replacement.
        let mut db_replica = first.placed[0].clone();
        db_replica.state = ReplicaState::Running;
        let nodes = [ready_with("a", 4000, 4000), ready_with("b", 4000, 4000)];
        let (_, second) = pass_of(&workloads, std::slice::from_ref(&db_replica), &nodes);
        assert!(second.preempted.is_empty(), "{second:?}");
        assert_eq!(second.placed.len(), 1, "{second:?}");
        assert_eq!(second.placed[0].workload, "batch");
        assert_eq!(second.placed[0].node_id, "b");

        // With nowhere to go, the batch replica waits: it never evicts the
        // higher-priority one back (no ping-pong).
        let nodes = [ready_with("a", 4000, 4000)];
        let (_, third) = pass_of(&workloads, std::slice::from_ref(&db_replica), &nodes);
        assert!(
            third.placed.is_empty() && third.preempted.is_empty(),
            "{third:?}"
        );
        assert_eq!(third.unplaced.len(), 1, "{third:?}");
        // Counted for the metrics by the reason that removed the node.
        assert_eq!(
            third.stats.unplaced,
            BTreeMap::from([("insufficient_cpu", 1)]),
            "{third:?}"
        );
    }

    #[test]
    fn a_replica_whose_node_was_removed_is_lost_and_replaced() {
        let nodes = [node("a", NodePhase::Ready)];
        let replicas = [
            replica("kept", "a", 1, ReplicaState::Ready),
            replica("orphan", "gone", 1, ReplicaState::Ready),
        ];
        let p = plan(&[workload(2, 1)], &replicas, &nodes, 0);
        assert_eq!(removed(&p), ["orphan"]);
        assert_eq!(p.remove[0].1, "Lost");
        assert_eq!(p.place, [(0, 1)]);
    }

    #[test]
    fn one_pass_is_one_decision_with_its_removals_placements_and_events() {
        let nodes = [ready_with("a", 4000, 4000)];
        let replicas = [
            replica("kept", "a", 1, ReplicaState::Ready),
            replica("orphan", "gone", 1, ReplicaState::Ready),
        ];
        let (d, unplaced, stats) = decide(
            &[workload(2, 1)],
            &replicas,
            &nodes,
            cloudless_types::SchedulerWeights::default(),
            0,
        )
        .expect("decide");
        assert!(unplaced.is_empty(), "{unplaced:?}");
        assert_eq!((stats.placed, stats.unplaced.len()), (1, 0));
        assert_eq!(d.remove, ["orphan"]);
        assert_eq!(d.place.len(), 1);
        assert_eq!(d.place[0].node_id, "a");
        let reasons: Vec<&str> = d.events.iter().map(|e| e.reason.as_str()).collect();
        assert_eq!(reasons, ["Lost", "Scheduled"]);
        // It fits one Raft entry: one command for the whole pass.
        assert_eq!(
            split_decision(d.clone(), 256 << 10),
            std::slice::from_ref(&d)
        );

        // Nothing to do: an empty decision, nothing written.
        let settled = [
            replica("kept", "a", 1, ReplicaState::Ready),
            replica("other", "a", 1, ReplicaState::Ready),
        ];
        let (d, _, _) = decide(
            &[workload(2, 1)],
            &settled,
            &nodes,
            cloudless_types::SchedulerWeights::default(),
            0,
        )
        .expect("decide");
        assert!(d.is_empty(), "{d:?}");
    }

    #[test]
    fn a_decision_too_large_for_one_entry_is_split_in_the_order_it_applies() {
        let d = ReconcileDecision {
            remove: (0..50).map(|i| format!("old-{i}")).collect(),
            place: (0..50)
                .map(|i| replica(&format!("new-{i}"), "a", 1, ReplicaState::Pending))
                .collect(),
            clear_unknown: vec!["back".into()],
            events: vec![EventRecord {
                at_ms: 0,
                kind: "Workload".into(),
                namespace: "default".into(),
                object: "web".into(),
                reason: "Scheduled".into(),
                message: "m".into(),
            }],
            ..ReconcileDecision::default()
        };
        let parts = split_decision(d.clone(), 1024);
        assert!(parts.len() > 3, "{} parts", parts.len());
        for p in &parts {
            assert!(
                postcard::experimental::serialized_size(p).expect("size") <= 1024 + 512,
                "a part of {} bytes",
                postcard::experimental::serialized_size(p).expect("size")
            );
        }
        // Concatenated, the parts are the decision, removals before
        // placements before clearing before events.
        let mut joined = ReconcileDecision::default();
        let mut order = Vec::new();
        for p in parts {
            for (name, empty) in [
                ("remove", p.remove.is_empty()),
                ("place", p.place.is_empty()),
                ("clear", p.clear_unknown.is_empty()),
                ("events", p.events.is_empty()),
            ] {
                if !empty && order.last() != Some(&name) {
                    order.push(name);
                }
            }
            joined.remove.extend(p.remove);
            joined.place.extend(p.place);
            joined.clear_unknown.extend(p.clear_unknown);
            joined.events.extend(p.events);
        }
        assert_eq!(order, ["remove", "place", "clear", "events"]);
        assert_eq!(joined, d);
    }

    /// Runs passes until nothing changes: placed replicas come up on `to`
    /// (Pending, then Ready one pass later). Returns the replicas left and
    /// the fewest Ready replicas seen after any pass's removals.
    fn drain_to_completion(
        w: &Workload,
        mut replicas: Vec<ReplicaRecord>,
        nodes: &[NodeRecord],
        to: &str,
    ) -> (Vec<ReplicaRecord>, usize) {
        let mut fewest_ready = usize::MAX;
        let mut next = 0;
        for _ in 0..50 {
            let p = plan(std::slice::from_ref(w), &replicas, nodes, 0);
            if p.remove.is_empty() && p.place.is_empty() && replicas.iter().all(is_ready) {
                return (replicas, fewest_ready);
            }
            let gone: HashSet<&str> = p.remove.iter().map(|(id, _, _)| id.as_str()).collect();
            replicas.retain(|r| !gone.contains(r.id.as_str()));
            fewest_ready = fewest_ready.min(replicas.iter().filter(|r| is_ready(r)).count());
            for r in &mut replicas {
                if r.state == ReplicaState::Pending {
                    r.state = ReplicaState::Ready;
                }
            }
            for (_, count) in p.place {
                for _ in 0..count {
                    next += 1;
                    replicas.push(replica(
                        &format!("new{next}"),
                        to,
                        w.template,
                        ReplicaState::Pending,
                    ));
                }
            }
        }
        panic!("the drain did not finish in 50 passes: {replicas:?}");
    }

    #[test]
    fn a_drain_moves_every_replica_off_the_node_without_dropping_below_the_floor() {
        let mut a = node("a", NodePhase::Ready);
        a.draining = true;
        a.cordoned = true;
        let nodes = [a, node("b", NodePhase::Ready)];
        let on_a = |n: usize| -> Vec<ReplicaRecord> {
            (0..n)
                .map(|i| replica(&format!("a{i}"), "a", 1, ReplicaState::Ready))
                .collect()
        };
        // Default rollout (maxSurge 1, maxUnavailable 0): the floor is every
        // replica, so each replacement is Ready before the one it replaces goes.
        let w = workload(3, 1);
        let first = plan(std::slice::from_ref(&w), &on_a(3), &nodes, 0);
        assert!(first.remove.is_empty(), "{:?}", first.remove);
        assert_eq!(first.place, [(0, 1)], "one replacement at a time");
        let (left, fewest) = drain_to_completion(&w, on_a(3), &nodes, "b");
        assert_eq!(left.len(), 3);
        assert!(left.iter().all(|r| r.node_id == "b"), "{left:?}");
        assert_eq!(fewest, 3, "Ready replicas dipped below the floor");

        // maxSurge 0 with maxUnavailable 1: one may go first.
        let mut w = workload(3, 1);
        w.spec.rollout.max_surge = 0;
        w.spec.rollout.max_unavailable = 1;
        let (left, fewest) = drain_to_completion(&w, on_a(3), &nodes, "b");
        assert!(left.len() == 3 && left.iter().all(|r| r.node_id == "b"));
        assert_eq!(fewest, 2);

        // minAvailable holds what maxUnavailable would let go.
        let mut w = workload(3, 1);
        w.spec.rollout.max_unavailable = 2;
        w.spec.rollout.min_available = Some(3);
        let (left, fewest) = drain_to_completion(&w, on_a(3), &nodes, "b");
        assert!(left.len() == 3 && left.iter().all(|r| r.node_id == "b"));
        assert_eq!(fewest, 3);

        // Recreate and BlueGreen move within the floor too.
        for strategy in [RolloutStrategy::Recreate, RolloutStrategy::BlueGreen] {
            let mut w = workload(2, 1);
            w.spec.rollout.strategy = strategy;
            let (left, fewest) = drain_to_completion(&w, on_a(2), &nodes, "b");
            assert!(
                left.len() == 2 && left.iter().all(|r| r.node_id == "b"),
                "{strategy:?}"
            );
            assert_eq!(fewest, 2, "{strategy:?}");
        }

        // A replica not Ready on the draining node goes at once.
        let mut pending = on_a(1);
        pending[0].state = ReplicaState::Pending;
        let p = plan(&[workload(1, 1)], &pending, &nodes, 0);
        assert_eq!(removed(&p), ["a0"]);
        assert_eq!(p.remove[0].1, "Drained");
        assert_eq!(p.place, [(0, 1)]);
    }
}
