//! The live client connections of one listener, shared by its workers, for
//! admission at `max_connections`: when a new connection waits for a permit,
//! the longest-idle keep-alive connection is asked to go and make room.
//!
//! A connection joins when its task starts and leaves when it ends: one lock
//! each, never per request. Only an accept loop at the cap scans the members
//! (O(n), reading each one's clock word); the one chosen is signalled through
//! its own force token, which its task already watches, and decides itself,
//! on its own thread, whether it is still idle (`Membership::decline` if not).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::state::ClientState;

/// The live client connections of one listener.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Members by slot; a free slot is `None` and listed in `free`.
    slots: Vec<Option<Member>>,
    free: Vec<usize>,
    /// Accept loops holding a new connection until a permit frees.
    waiting: usize,
    /// Members asked to go that have neither ended nor declined yet.
    asked: usize,
}

struct Member {
    state: Arc<ClientState>,
    /// Cancelled to ask the connection to go.
    stop: CancellationToken,
    asked: bool,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere cannot leave the lists half-changed.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// An accept loop holds a new connection and waits for a permit: asks the
    /// longest-idle connection to go, unless enough are going already.
    pub fn wait(self: &Arc<Self>) -> Waiting {
        let mut inner = self.lock();
        inner.waiting += 1;
        inner.ask_enough();
        Waiting(self.clone())
    }
}

impl Inner {
    /// Asks idle members to go until as many are going as accept loops wait.
    /// A member whose request started after this look declines and asks on.
    fn ask_enough(&mut self) {
        while self.asked < self.waiting {
            let Some(slot) = self.longest_idle() else {
                return;
            };
            if let Some(member) = self.slots[slot].as_mut() {
                member.asked = true;
                member.stop.cancel();
                self.asked += 1;
            }
        }
    }

    /// The slot of the member idle the longest that has not been asked yet.
    fn longest_idle(&self) -> Option<usize> {
        let mut best: Option<(Instant, usize)> = None;
        for (slot, member) in self.slots.iter().enumerate() {
            let Some(member) = member.as_ref().filter(|m| !m.asked) else {
                continue;
            };
            if let Some(since) = member.state.clock.idle_since() {
                if best.is_none_or(|(oldest, _)| since < oldest) {
                    best = Some((since, slot));
                }
            }
        }
        best.map(|(_, slot)| slot)
    }
}

/// An accept loop waiting at the cap with a new connection in hand; it stops
/// counting when dropped.
pub struct Waiting(Arc<Registry>);

impl Waiting {
    /// Looks again for idle connections to ask, when fewer are going than
    /// accept loops wait (they were all busy, or one declined with no other
    /// idle): connections may have gone idle since.
    pub fn rescan(&self) {
        self.0.lock().ask_enough();
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.lock().waiting -= 1;
    }
}

/// What admits a client connection: its permit under the listener's
/// `max_connections`, held for the connection's life, and the registry it
/// joins when the listener evicts idle connections at its cap.
pub struct Admitted {
    permit: OwnedSemaphorePermit,
    registry: Option<Arc<Registry>>,
}

impl Admitted {
    /// A connection admitted with `permit`, joining `registry` if any.
    pub fn new(permit: OwnedSemaphorePermit, registry: Option<Arc<Registry>>) -> Self {
        Self { permit, registry }
    }

    /// The connection's membership for its life: `stop` is cancelled to ask it
    /// to go.
    pub(super) fn join(self, state: &Arc<ClientState>, stop: &CancellationToken) -> Membership {
        let slot = self.registry.as_ref().map(|registry| {
            let mut inner = registry.lock();
            let member = Member {
                state: state.clone(),
                stop: stop.clone(),
                asked: false,
            };
            match inner.free.pop() {
                Some(slot) => {
                    inner.slots[slot] = Some(member);
                    slot
                }
                None => {
                    inner.slots.push(Some(member));
                    inner.slots.len() - 1
                }
            }
        });
        Membership {
            permit: Some(self.permit),
            registry: self.registry,
            slot: slot.unwrap_or(0),
        }
    }
}

/// A connection's place in its listener's registry (if it has one) and its
/// permit; both are given up when it is dropped.
pub(super) struct Membership {
    permit: Option<OwnedSemaphorePermit>,
    registry: Option<Arc<Registry>>,
    slot: usize,
}

impl Membership {
    /// The connection was asked to go but a request has started on it since:
    /// it stays, can be asked again through `stop` (its fresh token), and the
    /// request to make room passes to the next idle connection.
    pub(super) fn decline(&self, stop: CancellationToken) {
        let Some(registry) = &self.registry else {
            return;
        };
        let mut inner = registry.lock();
        let Some(member) = inner.slots[self.slot].as_mut() else {
            return;
        };
        let spent = std::mem::replace(&mut member.stop, stop);
        let was_asked = std::mem::replace(&mut member.asked, false);
        if was_asked {
            inner.asked -= 1;
        }
        inner.ask_enough();
        drop(inner);
        drop(spent);
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        // The permit first: the accept loop waiting for it takes it before it
        // would rescan (its permit is polled first), so this connection no
        // longer counting as going cannot make it ask one connection too many.
        drop(self.permit.take());
        let Some(registry) = &self.registry else {
            return;
        };
        let mut inner = registry.lock();
        let member = inner.slots[self.slot].take();
        inner.free.push(self.slot);
        if member.as_ref().is_some_and(|m| m.asked) {
            inner.asked -= 1;
        }
        drop(inner);
        // Its token's clone goes outside the lock (dropping it takes the
        // token tree's).
        drop(member);
    }
}
