//! The Search app's server half: words of `dictionary.db` containing given
//! letters, one LIKE pattern per ordering of the letters, then a sleep
//! standing in for heavy work. The dictionary is built into the app's base
//! volume by [`build_dictionary`].

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::Connection;
use tonic::{Request, Response, Status};

use crate::pb::search::search_server::Search;
use crate::pb::search::{FindReply, FindRequest};

/// Most letters a query may have (orderings grow as n!).
pub const MAX_LETTERS: usize = 6;

/// The Search service over one dictionary.
#[derive(Debug)]
pub struct SearchService {
    db: Mutex<Connection>,
}

impl SearchService {
    /// Opens `dir/dictionary.db`, which must exist.
    pub fn open(dir: &Path) -> rusqlite::Result<Self> {
        let db = Connection::open_with_flags(
            dir.join("dictionary.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE,
        )?;
        Ok(SearchService { db: Mutex::new(db) })
    }
}

/// Every ordering of `letters`.
pub fn orderings(letters: &[char]) -> Vec<Vec<char>> {
    if letters.len() <= 1 {
        return vec![letters.to_vec()];
    }
    let mut out = Vec::new();
    for i in 0..letters.len() {
        let mut rest = letters.to_vec();
        let c = rest.remove(i);
        for mut o in orderings(&rest) {
            o.insert(0, c);
            out.push(o);
        }
    }
    out
}

#[tonic::async_trait]
impl Search for SearchService {
    async fn find(&self, req: Request<FindRequest>) -> Result<Response<FindReply>, Status> {
        let r = req.into_inner();
        let letters: Vec<char> = r.letters.to_lowercase().chars().collect();
        if letters.is_empty()
            || letters.len() > MAX_LETTERS
            || !letters.iter().all(char::is_ascii_lowercase)
        {
            return Err(Status::invalid_argument(format!(
                "letters: 1 to {MAX_LETTERS} of a-z"
            )));
        }
        let orders = orderings(&letters);
        let mut words = std::collections::BTreeSet::new();
        {
            let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
            let mut st = db
                .prepare_cached("SELECT word FROM words WHERE word LIKE ?1")
                .map_err(|e| Status::internal(e.to_string()))?;
            for o in &orders {
                let pattern: String = std::iter::once('%')
                    .chain(o.iter().flat_map(|c| [*c, '%']))
                    .collect();
                let rows = st
                    .query_map([&pattern], |row| row.get::<_, String>(0))
                    .map_err(|e| Status::internal(e.to_string()))?;
                for w in rows {
                    words.insert(w.map_err(|e| Status::internal(e.to_string()))?);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(u64::from(r.sleep_ms.min(600_000)))).await;
        Ok(Response::new(FindReply {
            words: words.into_iter().collect(),
            patterns: orders.len() as u32,
        }))
    }
}

/// Words for the dictionary: Debian's word list when installed, else a
/// generated list of pronounceable words (deterministic).
pub fn word_list() -> Vec<String> {
    if let Ok(text) = std::fs::read_to_string("/usr/share/dict/words") {
        let words: Vec<String> = text
            .lines()
            .map(str::to_lowercase)
            .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase()))
            .collect();
        if words.len() > 1000 {
            return words;
        }
    }
    let (cons, vow) = (b"bcdfghjklmnprstvwz", b"aeiou");
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..60_000)
        .map(|_| {
            let syl = 1 + next() % 4;
            (0..syl)
                .flat_map(|_| {
                    [
                        cons[(next() % cons.len() as u64) as usize],
                        vow[(next() % 5) as usize],
                    ]
                })
                .map(char::from)
                .collect()
        })
        .collect()
}

/// Builds `path` (a SQLite dictionary) from `words`.
pub fn build_dictionary(path: &Path, words: &[String]) -> rusqlite::Result<usize> {
    let _ = std::fs::remove_file(path);
    let mut db = Connection::open(path)?;
    db.execute_batch("CREATE TABLE words (word TEXT NOT NULL)")?;
    let tx = db.transaction()?;
    {
        let mut st = tx.prepare("INSERT INTO words (word) VALUES (?1)")?;
        for w in words {
            st.execute([w])?;
        }
    }
    tx.commit()?;
    Ok(words.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orderings_of_four_letters() {
        let o = orderings(&['a', 'b', 'c', 'd']);
        assert_eq!(o.len(), 24);
        let set: std::collections::BTreeSet<_> = o.into_iter().collect();
        assert_eq!(set.len(), 24);
    }
}
