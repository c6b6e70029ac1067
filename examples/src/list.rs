//! The List app's server half: a to-do list in `list.db` on the volume.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::Connection;
use tonic::{Request, Response, Status};

use crate::pb::list::list_server::List;
use crate::pb::list::{AddReply, AddRequest, ItemsReply, ItemsRequest};

/// Longest item accepted.
pub const MAX_ITEM: usize = 4096;

/// The List service over one database.
#[derive(Debug)]
pub struct ListService {
    db: Mutex<Connection>,
}

fn internal(e: rusqlite::Error) -> Status {
    Status::internal(format!("list.db: {e}"))
}

impl ListService {
    /// Opens (creating) `dir/list.db`.
    pub fn open(dir: &Path) -> rusqlite::Result<Self> {
        let db = Connection::open(dir.join("list.db"))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, text TEXT NOT NULL)",
        )?;
        Ok(ListService { db: Mutex::new(db) })
    }
}

#[tonic::async_trait]
impl List for ListService {
    async fn add(&self, req: Request<AddRequest>) -> Result<Response<AddReply>, Status> {
        let item = req.into_inner().item;
        if item.is_empty() || item.len() > MAX_ITEM {
            return Err(Status::invalid_argument(format!(
                "an item has 1 to {MAX_ITEM} bytes"
            )));
        }
        let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
        db.execute("INSERT INTO items (text) VALUES (?1)", [&item])
            .map_err(internal)?;
        let count: i64 = db
            .query_row("SELECT count(*) FROM items", [], |r| r.get(0))
            .map_err(internal)?;
        Ok(Response::new(AddReply {
            count: count as u64,
        }))
    }

    async fn items(&self, req: Request<ItemsRequest>) -> Result<Response<ItemsReply>, Status> {
        let delay =
            Duration::from_millis(u64::from(req.into_inner().delay_ms_per_item.min(60_000)));
        let items: Vec<String> = {
            let db = self.db.lock().unwrap_or_else(|p| p.into_inner());
            let mut st = db
                .prepare("SELECT text FROM items ORDER BY id")
                .map_err(internal)?;
            st.query_map([], |r| r.get(0))
                .map_err(internal)?
                .collect::<Result<_, _>>()
                .map_err(internal)?
        };
        // The thesis's per-item work: the call takes longer the longer the list.
        tokio::time::sleep(delay * items.len() as u32).await;
        Ok(Response::new(ItemsReply { items }))
    }
}
