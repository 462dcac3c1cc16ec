//! A value computed from the applied state once per state revision (the
//! `changes` counter of `cloudless_state::StateReader`) and shared by every
//! assignment watch at that revision, so that a change costs one
//! computation, not one per agent.

use std::sync::{Arc, Mutex};

/// The last value computed and the revision it was computed at.
#[derive(Debug)]
pub(crate) struct RevisionCache<T>(Mutex<Option<(u64, Arc<T>)>>);

impl<T> Default for RevisionCache<T> {
    fn default() -> Self {
        Self(Mutex::new(None))
    }
}

impl<T> RevisionCache<T> {
    /// The cached value, if computed at `revision`; else `compute`s and
    /// caches it. A value computed at a revision holds at least the state
    /// of that revision (the counter moves after the commit it counts).
    pub(crate) fn at<E>(
        &self,
        revision: u64,
        compute: impl FnOnce() -> Result<T, E>,
    ) -> Result<Arc<T>, E> {
        let mut cached = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((r, c)) = cached.as_ref() {
            if *r == revision {
                return Ok(c.clone());
            }
        }
        let c = Arc::new(compute()?);
        *cached = Some((revision, c.clone()));
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_computed_once_per_revision() {
        let cache = RevisionCache::<u64>::default();
        let mut computed = 0;
        for revision in [1, 1, 1, 2, 2] {
            let v = cache
                .at(revision, || {
                    computed += 1;
                    Ok::<_, ()>(revision * 10)
                })
                .expect("computed");
            assert_eq!(*v, revision * 10);
        }
        assert_eq!(computed, 2);
        assert_eq!(cache.at(3, || Err("storage")), Err("storage"));
        assert_eq!(*cache.at(2, || Ok::<_, ()>(0)).expect("cached"), 20);
    }
}
