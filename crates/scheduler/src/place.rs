//! Placing replicas: compile the request, scan, score, reserve, preempt.

use crate::compiled::Compiled;
use crate::explain::{CandidateScore, Decision, Placement, Unplaced};
use crate::filter::{check, describe, detail, Filtered, REASONS};
use crate::input::WorkloadRequest;
use crate::score::{score, Factors};
use crate::snapshot::{ClusterSnapshot, Resident, ResidentId, SchedulerError};

/// How many candidates an explanation lists.
const EXPLAIN_TOP: usize = 5;
/// A replica may evict replicas whose priority is at least this much lower.
pub const PREEMPTION_PRIORITY_GAP: i32 = 10;

/// One node's verdict: its factor scores, or the first constraint it fails.
pub type NodeVerdict = Result<CandidateScore, Filtered>;

impl ClusterSnapshot {
    /// Places `req.replicas` replicas, reserving resources as it goes, and
    /// returns one decision per replica. With `explain`, placed replicas list
    /// their best candidates with factor scores.
    pub fn place(
        &mut self,
        req: &WorkloadRequest,
        now_ms: i64,
        explain: bool,
    ) -> Result<Vec<Decision>, SchedulerError> {
        let c = self.compile(req, now_ms)?;
        let mut out = Vec::with_capacity(req.replicas as usize);
        for replica in 0..req.replicas {
            out.push(self.place_one(&c, replica, explain));
        }
        Ok(out)
    }

    /// Every node's verdict for one more replica of `req`, in node order:
    /// its factor scores, or the first constraint it fails. Reserves nothing.
    pub fn evaluate(
        &mut self,
        req: &WorkloadRequest,
        now_ms: i64,
    ) -> Result<Vec<(String, NodeVerdict)>, SchedulerError> {
        let c = self.compile(req, now_ms)?;
        Ok((0..self.nodes.len())
            .map(|i| {
                let node = &self.nodes[i];
                let name = self.strings.name(node.id).to_owned();
                let verdict = match check(self, node, &c, false) {
                    Ok(()) => {
                        let f = score(self, node, &c);
                        Ok(self.candidate(u32::try_from(i).unwrap_or(u32::MAX), &f))
                    }
                    Err(reason) => Err(Filtered {
                        reason,
                        detail: detail(self, node, &c, reason),
                    }),
                };
                (name, verdict)
            })
            .collect())
    }

    fn place_one(&mut self, c: &Compiled, replica: u32, explain: bool) -> Decision {
        let mut counts = [0u32; REASONS];
        let mut top: Vec<(f32, u32, Factors)> = Vec::new();
        let found = if c.spread {
            self.scan_spread(c, &mut counts, &mut top, explain)
        } else {
            self.scan_all(c, &mut counts, &mut top, explain)
        };
        if let Some((total, idx, _)) = found {
            self.reserve(idx, c);
            return Decision::Placed(Placement {
                replica,
                node: self.strings.name(self.nodes[idx as usize].id).to_owned(),
                score: f64::from(total),
                preempted: Vec::new(),
                candidates: top.iter().map(|(_, i, f)| self.candidate(*i, f)).collect(),
            });
        }
        if let Some((idx, victims)) = self.preemption_target(c) {
            let preempted = self.evict(idx, &victims);
            self.reserve(idx, c);
            let f = score(self, &self.nodes[idx as usize], c);
            return Decision::Placed(Placement {
                replica,
                node: self.strings.name(self.nodes[idx as usize].id).to_owned(),
                score: f64::from(f.total),
                preempted,
                candidates: Vec::new(),
            });
        }
        Decision::Unplaced(Unplaced {
            replica,
            reasons: describe(&counts, c, self, self.nodes.len()),
        })
    }

    /// Considers one node: filter, then score, keeping the best (and the top few when explaining).
    fn consider(
        &self,
        idx: u32,
        c: &Compiled,
        counts: &mut [u32; REASONS],
        best: &mut Option<(f32, u32, Factors)>,
        top: &mut Vec<(f32, u32, Factors)>,
        explain: bool,
    ) -> bool {
        let node = &self.nodes[idx as usize];
        if let Err(reason) = check(self, node, c, false) {
            counts[reason.index()] += 1;
            return false;
        }
        let f = score(self, node, c);
        // Strictly greater wins: ties go to the node scanned first (node id order within a scan).
        if best.is_none_or(|(b, _, _)| f.total > b) {
            *best = Some((f.total, idx, f));
        }
        if explain {
            top.push((f.total, idx, f));
            top.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            top.truncate(EXPLAIN_TOP);
        }
        true
    }

    /// Scans every node from the rotating start until `score_limit` feasible nodes were scored.
    fn scan_all(
        &mut self,
        c: &Compiled,
        counts: &mut [u32; REASONS],
        top: &mut Vec<(f32, u32, Factors)>,
        explain: bool,
    ) -> Option<(f32, u32, Factors)> {
        let n = self.nodes.len();
        let mut best = None;
        let mut feasible = 0;
        let mut scanned = 0;
        while scanned < n && feasible < self.score_limit {
            let idx = ((self.next_start + scanned) % n) as u32;
            scanned += 1;
            if self.consider(idx, c, counts, &mut best, top, explain) {
                feasible += 1;
            }
        }
        if n > 0 {
            self.next_start = (self.next_start + scanned) % n;
        }
        best
    }

    /// Zone spread: tries the zones holding the fewest replicas of the workload
    /// first, and only moves to fuller zones when none of those has a feasible node.
    fn scan_spread(
        &mut self,
        c: &Compiled,
        counts: &mut [u32; REASONS],
        top: &mut Vec<(f32, u32, Factors)>,
        explain: bool,
    ) -> Option<(f32, u32, Factors)> {
        let mut order: Vec<(u32, usize, u32)> = self
            .zones
            .iter()
            .enumerate()
            .map(|(pos, z)| {
                (
                    self.zone_counts
                        .get(&(c.workload, *z))
                        .copied()
                        .unwrap_or(0),
                    pos,
                    *z,
                )
            })
            .collect();
        order.sort_unstable();
        let mut start = 0;
        while start < order.len() {
            let level = order[start].0;
            let end = order[start..]
                .iter()
                .position(|o| o.0 != level)
                .map_or(order.len(), |p| start + p);
            let mut best = None;
            let mut feasible = 0;
            'group: for &(_, _, zone) in &order[start..end] {
                for &idx in self
                    .by_zone
                    .get(&zone)
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                {
                    if self.consider(idx, c, counts, &mut best, top, explain) {
                        feasible += 1;
                        if feasible >= self.score_limit {
                            break 'group;
                        }
                    }
                }
            }
            if best.is_some() {
                return best;
            }
            start = end;
        }
        None
    }

    fn reserve(&mut self, idx: u32, c: &Compiled) {
        self.placed += 1;
        // Named only if it is ever reported as a preemption victim.
        let id = ResidentId::Placed(self.placed);
        let node = &mut self.nodes[idx as usize];
        for (r, add) in node.reserved.iter_mut().zip(c.requests) {
            *r = r.saturating_add(add);
        }
        node.residents.push(Resident {
            id,
            workload: c.workload,
            priority: c.priority,
            requests: c.requests,
            host_ports: c.host_ports.clone().into_boxed_slice(),
        });
        *self.zone_counts.entry((c.workload, node.zone)).or_insert(0) += 1;
    }

    fn candidate(&self, idx: u32, f: &Factors) -> CandidateScore {
        CandidateScore {
            node: self.strings.name(self.nodes[idx as usize].id).to_owned(),
            total: f64::from(f.total),
            locality: f64::from(f.locality),
            reliability: f64::from(f.reliability),
            cost: f64::from(f.cost),
            utilization: f64::from(f.utilization),
            network_penalty: f64::from(f.network_penalty),
            adjustment: f64::from(f.adjustment),
        }
    }

    /// The node where evicting replicas at least [`PREEMPTION_PRIORITY_GAP`]
    /// lower in priority makes room: fewest victims, then the lowest highest
    /// victim priority, then node order. Victims are taken lowest priority first.
    fn preemption_target(&self, c: &Compiled) -> Option<(u32, Vec<usize>)> {
        let mut best: Option<((usize, i32), u32, Vec<usize>)> = None;
        for (idx, node) in self.nodes.iter().enumerate() {
            if check(self, node, c, true).is_err() {
                continue;
            }
            let mut victims: Vec<usize> = (0..node.residents.len())
                .filter(|&i| {
                    node.residents[i].priority <= c.priority.saturating_sub(PREEMPTION_PRIORITY_GAP)
                })
                .collect();
            // Lowest priority first; among equals the largest first, so fewer are needed.
            victims.sort_by(|&a, &b| {
                let (ra, rb) = (&node.residents[a], &node.residents[b]);
                ra.priority
                    .cmp(&rb.priority)
                    .then(rb.requests.cmp(&ra.requests))
                    .then(a.cmp(&b))
            });
            let mut free: [u64; 4] =
                std::array::from_fn(|i| node.capacity[i].saturating_sub(node.reserved[i]));
            let fits =
                |free: &[u64; 4]| (0..4).all(|i| c.requests[i] == 0 || free[i] >= c.requests[i]);
            let mut chosen = Vec::new();
            for v in victims {
                if fits(&free) {
                    break;
                }
                for (f, r) in free.iter_mut().zip(node.residents[v].requests) {
                    *f = f.saturating_add(r);
                }
                chosen.push(v);
            }
            if chosen.is_empty() || !fits(&free) {
                continue;
            }
            let key = (
                chosen.len(),
                chosen
                    .iter()
                    .map(|&v| node.residents[v].priority)
                    .max()
                    .unwrap_or(i32::MIN),
            );
            if best.as_ref().is_none_or(|(k, _, _)| key < *k) {
                best = Some((key, idx as u32, chosen));
            }
        }
        best.map(|(_, idx, v)| (idx, v))
    }

    fn evict(&mut self, idx: u32, victims: &[usize]) -> Vec<String> {
        let mut victims = victims.to_vec();
        victims.sort_unstable_by(|a, b| b.cmp(a));
        let mut names = Vec::with_capacity(victims.len());
        for v in victims {
            let node = &mut self.nodes[idx as usize];
            let r = node.residents.swap_remove(v);
            for (acc, sub) in node.reserved.iter_mut().zip(r.requests) {
                *acc = acc.saturating_sub(sub);
            }
            let zone = node.zone;
            if let Some(n) = self.zone_counts.get_mut(&(r.workload, zone)) {
                *n = n.saturating_sub(1);
            }
            names.push(match r.id {
                ResidentId::Named(id) => self.strings.name(id).to_owned(),
                ResidentId::Placed(seq) => format!("{}#{seq}", self.strings.name(r.workload)),
            });
        }
        names.sort();
        names
    }
}
