//! Ids of map slots (stats slots, Maglev tables, backend slots) handed out by the table.

use std::collections::VecDeque;

/// Ids handed out lowest-new first, reused oldest-freed first (so that a freed stats slot's
/// lingering flows rarely count into its next owner).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pool {
    free: VecDeque<u32>,
    next: u32,
    pub max: u32,
}

impl Pool {
    pub fn new(max: u32) -> Self {
        Self {
            free: VecDeque::new(),
            next: 0,
            max,
        }
    }

    pub fn available(&self) -> u32 {
        self.max - self.next + self.free.len() as u32
    }

    /// An id, and whether it was used before.
    pub fn take_reused(&mut self) -> Option<(u32, bool)> {
        if let Some(id) = self.free.pop_front() {
            return Some((id, true));
        }
        (self.next < self.max).then(|| {
            self.next += 1;
            (self.next - 1, false)
        })
    }

    /// Frees an id that a mapping no longer uses.
    pub fn give(&mut self, id: u32) {
        self.free.push_back(id);
    }

    /// Undoes the latest take of `id`, which `take_reused` said was `reused` (undo in reverse
    /// order of taking): the pool is exactly as before that take.
    pub fn untake(&mut self, id: u32, reused: bool) {
        if reused {
            self.free.push_front(id);
        } else {
            debug_assert_eq!(id + 1, self.next, "untake in reverse order of taking");
            self.next -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untake_restores_the_pool_exactly() {
        let mut pool = Pool::new(4);
        let (a, _) = pool.take_reused().unwrap();
        pool.give(a);
        let before = pool.clone();
        let (reused, was_used) = pool.take_reused().unwrap();
        let (fresh, fresh_used) = pool.take_reused().unwrap();
        assert!(was_used && reused == a && fresh == 1 && !fresh_used);
        pool.untake(fresh, false);
        pool.untake(reused, true);
        assert_eq!(pool, before);
    }
}
