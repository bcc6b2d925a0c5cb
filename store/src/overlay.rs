//! A sub-transaction: buffered writes over a parent [`Kv`].
//!
//! Group commit runs many payment commands inside one store transaction and syncs once.
//! Each command runs in its own `Overlay`: its reads see the parent plus its own writes;
//! on success [`Overlay::merge`] hands its writes to the parent, on failure dropping it
//! discards them, so one refused payment never leaks a partial write into the batch.

use std::collections::BTreeMap;

use crate::{Kv, Pair, Result};

pub struct Overlay<'a, P: Kv + ?Sized> {
    parent: &'a mut P,
    /// `None` marks a delete.
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a, P: Kv + ?Sized> Overlay<'a, P> {
    pub fn new(parent: &'a mut P) -> Self {
        Overlay {
            parent,
            writes: BTreeMap::new(),
        }
    }

    /// Applies the buffered writes to the parent.
    pub fn merge(self) -> Result<()> {
        for (k, v) in self.writes {
            match v {
                Some(v) => self.parent.put(&k, &v)?,
                None => self.parent.delete(&k)?,
            }
        }
        Ok(())
    }

    /// How many writes are buffered.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }
}

impl<P: Kv + ?Sized> Kv for Overlay<'_, P> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.writes.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.parent.get(key),
        }
    }

    fn get_for_update(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        // Register the key with the parent even if we wrote it: the conflict check belongs
        // to the store transaction.
        let stored = self.parent.get_for_update(key)?;
        match self.writes.get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(stored),
        }
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        self.writes.insert(key.to_vec(), Some(value.to_vec()));
        Ok(())
    }

    fn delete(&mut self, key: &[u8]) -> Result<()> {
        self.writes.insert(key.to_vec(), None);
        Ok(())
    }

    fn scan(&mut self, start: &[u8], end: &[u8], limit: usize) -> Result<Vec<Pair>> {
        // Over-fetch from the parent by the number of local deletes in range so that the
        // merged result still has `limit` live pairs when the parent has them.
        let local: Vec<(&Vec<u8>, &Option<Vec<u8>>)> =
            self.writes.range(start.to_vec()..end.to_vec()).collect();
        let deletes = local.iter().filter(|(_, v)| v.is_none()).count();
        // Bounded by what one scan may ask; a shorter merged page is still correct (the
        // horizon below stops it where the parent's page ended).
        let want = (limit + deletes).min(crate::SCAN_LIMIT_MAX);
        let base = self.parent.scan(start, end, want)?;
        // If the parent stopped at `want`, keys past its last one are unknown: local inserts
        // beyond it must wait for the next page or the order would have holes.
        let horizon = (base.len() == want)
            .then(|| base.last().map(|(k, _)| k.clone()))
            .flatten();
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = base.into_iter().collect();
        for (k, v) in local {
            match v {
                Some(v) => merged.insert(k.clone(), v.clone()),
                None => merged.remove(k),
            };
        }
        if let Some(h) = horizon {
            merged.retain(|k, _| *k <= h);
        }
        Ok(merged.into_iter().take(limit).collect())
    }
}
