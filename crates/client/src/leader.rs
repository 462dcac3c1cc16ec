//! Which coordinator to call next: the last known leader, else each
//! configured address in turn, following leader hints.

use tonic::Status;

use crate::leader_hint;

/// Leader following over a fixed list of coordinator addresses.
#[derive(Debug, Clone)]
pub struct LeaderFollower {
    addresses: Vec<String>,
    /// The last address that served a call, or the leader a coordinator named.
    preferred: Option<String>,
    /// The configured address to try when no leader is known.
    next: usize,
}

impl LeaderFollower {
    /// Follows the coordinators at `addresses`, starting with the first.
    pub fn new(addresses: Vec<String>) -> Self {
        Self {
            addresses,
            preferred: None,
            next: 0,
        }
    }

    /// The configured addresses.
    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    /// The last known leader (the address that last served, or a hint).
    pub fn preferred(&self) -> Option<&str> {
        self.preferred.as_deref()
    }

    /// The address to call next; `None` when no address is configured.
    pub fn current(&self) -> Option<&str> {
        self.preferred.as_deref().or_else(|| {
            self.addresses
                .get(self.next % self.addresses.len().max(1))
                .map(String::as_str)
        })
    }

    /// `address` served a call: keep calling it.
    pub fn succeeded(&mut self, address: &str) {
        self.preferred = Some(address.to_owned());
    }

    /// `address` could not serve a call: follow the leader hint in `status`
    /// (unless it names `address` itself), else move on to the next
    /// configured address. Returns whether a hint is being followed.
    pub fn failed(&mut self, address: &str, status: &Status) -> bool {
        let hint = leader_hint(status)
            .filter(|h| *h != address)
            .map(str::to_owned);
        if hint.is_none() {
            self.next = self.next.wrapping_add(1);
        }
        self.preferred = hint;
        self.preferred.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LEADER_HINT_KEY;

    fn hinted(leader: &str) -> Status {
        let mut s = Status::unavailable("not the leader");
        s.metadata_mut()
            .insert(LEADER_HINT_KEY, leader.parse().expect("ascii"));
        s
    }

    fn follower() -> LeaderFollower {
        LeaderFollower::new(vec!["a:1".into(), "b:1".into(), "c:1".into()])
    }

    #[test]
    fn without_hints_the_configured_addresses_are_tried_in_turn() {
        let mut f = follower();
        let down = Status::unavailable("connection refused");
        let mut seen = Vec::new();
        for _ in 0..4 {
            let a = f.current().expect("configured").to_owned();
            assert!(!f.failed(&a, &down));
            seen.push(a);
        }
        assert_eq!(seen, ["a:1", "b:1", "c:1", "a:1"]);
    }

    #[test]
    fn a_hint_is_followed_and_the_leader_kept_after_success() {
        let mut f = follower();
        assert!(f.failed("a:1", &hinted("c:1")));
        assert_eq!(f.current(), Some("c:1"));
        f.succeeded("c:1");
        assert_eq!(f.current(), Some("c:1"));
        assert_eq!(f.preferred(), Some("c:1"));
    }

    #[test]
    fn a_hint_naming_an_unlisted_address_is_followed() {
        let mut f = follower();
        assert!(f.failed("a:1", &hinted("[fd00::9]:7400")));
        assert_eq!(f.current(), Some("[fd00::9]:7400"));
    }

    #[test]
    fn a_hint_naming_the_failed_address_itself_moves_on() {
        let mut f = follower();
        f.succeeded("a:1");
        assert!(!f.failed("a:1", &hinted("a:1")));
        assert_eq!(f.current(), Some("b:1"));
    }

    #[test]
    fn a_failed_leader_is_forgotten() {
        let mut f = follower();
        f.succeeded("b:1");
        assert!(!f.failed("b:1", &Status::unavailable("gone")));
        assert_eq!(f.preferred(), None);
        assert_eq!(f.current(), Some("b:1"));
    }

    #[test]
    fn no_addresses_means_nothing_to_call() {
        assert_eq!(LeaderFollower::new(Vec::new()).current(), None);
    }
}
