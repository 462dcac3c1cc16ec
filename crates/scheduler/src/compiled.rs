//! A request compiled against a snapshot: every string resolved to the
//! snapshot's interned ids, every field checked. Placement, filters and
//! scores read it; it reads none of them.

use cloudless_types::MAX_REPLICAS;

use crate::input::{
    AntiAffinity, Operator, Strategy, TaintEffect, TolerationOperator, WorkloadRequest,
};
use crate::snapshot::{res, ClusterSnapshot, Node, Res, SchedulerError, UNKNOWN};

/// A request with every string resolved against the snapshot.
#[derive(Debug, Clone)]
pub(crate) struct Compiled {
    pub(crate) workload: u32,
    pub(crate) requests: Res,
    pub(crate) regions: Vec<u32>,
    pub(crate) primary_region: Option<u32>,
    pub(crate) zones: Vec<u32>,
    pub(crate) selector: Vec<(u32, u32)>,
    pub(crate) required: Vec<Expr>,
    pub(crate) preferred: Vec<(u32, Expr)>,
    pub(crate) preferred_total: u32,
    pub(crate) anti_affinity: AntiAffinity,
    pub(crate) tolerations: Vec<Tol>,
    pub(crate) spread: bool,
    pub(crate) binpack: bool,
    pub(crate) priority: i32,
    pub(crate) arch: Option<u32>,
    pub(crate) runtime_class: u32,
    pub(crate) long_running: bool,
    pub(crate) host_ports: Vec<(u16, cloudless_types::Protocol)>,
    pub(crate) now_ms: i64,
}

/// A compiled label requirement.
#[derive(Debug, Clone)]
pub(crate) struct Expr {
    pub(crate) key: u32,
    pub(crate) operator: Operator,
    pub(crate) values: Vec<u32>,
}

impl Expr {
    pub(crate) fn matches(&self, node: &Node) -> bool {
        let v = node.label(self.key);
        match self.operator {
            Operator::In => v.is_some_and(|v| self.values.contains(&v)),
            Operator::NotIn => v.is_none_or(|v| !self.values.contains(&v)),
            Operator::Exists => v.is_some(),
            Operator::DoesNotExist => v.is_none(),
        }
    }
}

/// A compiled toleration.
#[derive(Debug, Clone)]
pub(crate) struct Tol {
    /// `None`: every key (empty key with Exists).
    pub(crate) key: Option<u32>,
    pub(crate) operator: TolerationOperator,
    pub(crate) value: u32,
    pub(crate) effect: Option<TaintEffect>,
    pub(crate) seconds: Option<u64>,
}

impl Compiled {
    pub(crate) fn tolerates(
        &self,
        key: u32,
        value: u32,
        effect: TaintEffect,
        added_at_ms: i64,
    ) -> bool {
        self.tolerations.iter().any(|t| {
            let key_ok = t.key.is_none_or(|k| k == key);
            let value_ok = t.operator == TolerationOperator::Exists || t.value == value;
            let effect_ok = t.effect.is_none_or(|e| e == effect);
            let time_ok = match (effect, t.seconds) {
                (TaintEffect::NoExecute, Some(s)) => {
                    self.now_ms
                        < added_at_ms.saturating_add(
                            i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX),
                        )
                }
                _ => true,
            };
            key_ok && value_ok && effect_ok && time_ok
        })
    }
}

fn invalid(req: &WorkloadRequest, field: &'static str, problem: String) -> SchedulerError {
    SchedulerError::InvalidRequest {
        workload: req.workload.clone(),
        field,
        problem,
    }
}

impl ClusterSnapshot {
    pub(crate) fn compile(
        &mut self,
        req: &WorkloadRequest,
        now_ms: i64,
    ) -> Result<Compiled, SchedulerError> {
        if req.workload.is_empty() {
            return Err(invalid(req, "workload", "must not be empty".into()));
        }
        if req.replicas > MAX_REPLICAS {
            return Err(invalid(
                req,
                "replicas",
                format!("{} is above {MAX_REPLICAS}", req.replicas),
            ));
        }
        for t in &req.preferred {
            if !(1..=100).contains(&t.weight) {
                return Err(invalid(
                    req,
                    "preferred.weight",
                    format!("{} is outside 1..=100", t.weight),
                ));
            }
        }
        let exprs_ok = req
            .required
            .iter()
            .chain(req.preferred.iter().map(|p| &p.expression))
            .all(|e| {
                matches!(e.operator, Operator::Exists | Operator::DoesNotExist)
                    || !e.values.is_empty()
            });
        if !exprs_ok {
            return Err(invalid(
                req,
                "affinity",
                "In and NotIn need at least one value".into(),
            ));
        }
        let s = &self.strings;
        let expr = |e: &crate::input::MatchExpression| Expr {
            key: s.get(&e.key),
            operator: e.operator,
            values: e.values.iter().map(|v| s.get(v)).collect(),
        };
        let regions: Vec<u32> = req.regions.iter().map(|r| s.get(r)).collect();
        let spread = match req.strategy {
            Strategy::Auto => req.replicas > 1,
            Strategy::Spread => true,
            Strategy::Binpack => false,
        };
        let compiled = Compiled {
            workload: UNKNOWN,
            requests: res(&req.requests),
            primary_region: regions.first().copied(),
            regions,
            zones: req.zones.iter().map(|z| s.get(z)).collect(),
            selector: req
                .node_selector
                .iter()
                .map(|(k, v)| (s.get(k), s.get(v)))
                .collect(),
            required: req.required.iter().map(expr).collect(),
            preferred: req
                .preferred
                .iter()
                .map(|p| (p.weight, expr(&p.expression)))
                .collect(),
            preferred_total: req.preferred.iter().map(|p| p.weight).sum(),
            anti_affinity: req.anti_affinity,
            tolerations: req
                .tolerations
                .iter()
                .map(|t| Tol {
                    key: (!(t.key.is_empty() && t.operator == TolerationOperator::Exists))
                        .then(|| s.get(&t.key)),
                    operator: t.operator,
                    value: s.get(&t.value),
                    effect: t.effect,
                    seconds: t.toleration_seconds,
                })
                .collect(),
            spread,
            binpack: !spread,
            priority: req.priority,
            arch: req.arch.as_deref().map(|a| s.get(a)),
            runtime_class: req.runtime_class.as_deref().map_or(self.runc, |r| s.get(r)),
            long_running: req.long_running,
            host_ports: req.host_ports.clone(),
            now_ms,
        };
        Ok(Compiled {
            workload: self.strings.intern(&req.workload),
            ..compiled
        })
    }
}
