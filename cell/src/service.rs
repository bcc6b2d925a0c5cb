//! The gRPC face of a cell: request → validated [`Command`] → writer → response.
//!
//! Each handler parses (pure, so bad input is refused before anything is queued), submits to
//! the group-commit writer (writes) or reads a snapshot (reads), and maps errors to precise
//! statuses. Spans carry the request id, user, shard, cell and epoch.

use std::sync::Arc;
use std::time::Instant;

use ldc_core::proto::{self, cell_relay_server::CellRelay, payments_server::Payments};
use ldc_core::shard::shard_of;
use ldc_store::Store;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::error::PaymentError;
use crate::ledger::{self, Command, Ctx, Outcome};
use crate::metrics::CellMetrics;
use crate::model::validate_user;
use crate::writer::Writer;

/// Shared state of the cell's services.
#[derive(Clone)]
pub struct CellService {
    pub cell: Arc<str>,
    pub colour: Arc<str>,
    pub shard_count: u32,
    pub writer: Writer,
    pub store: Arc<dyn Store>,
    pub metrics: CellMetrics,
}

/// Stable metric label of a gRPC code (no allocation on the hot path).
fn code_label(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

fn request_id<T>(req: &Request<T>) -> String {
    req.metadata()
        .get(ldc_core::REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_default()
}

/// The router routes on the header; a body naming another user means a confused client.
/// Most credits in one `DeliverBatch`.
pub const DELIVER_BATCH_MAX: usize = 256;

fn delivered(o: Outcome) -> Option<proto::DeliverResponse> {
    match o {
        Outcome::Delivered(d) => Some(d),
        _ => None,
    }
}

fn check_header<T>(req: &Request<T>, user: &str) -> Result<(), PaymentError> {
    if let Some(h) = req.metadata().get(ldc_core::USER_HEADER) {
        let h = h.to_str().unwrap_or("");
        if h != user {
            return Err(PaymentError::InvalidArgument(format!(
                "header {} is {} but the request is for user {}; they must match (the router routes on the header)",
                ldc_core::USER_HEADER,
                crate::model::quote(h),
                crate::model::quote(user)
            )));
        }
    }
    Ok(())
}

impl CellService {
    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            cell: &self.cell,
            shard_count: self.shard_count,
            now_ms: 0,
        }
    }

    fn finish<T>(
        &self,
        method: &str,
        started: Instant,
        r: Result<T, PaymentError>,
    ) -> Result<Response<T>, Status> {
        let code = match &r {
            Ok(_) => tonic::Code::Ok,
            Err(e) => e.code(),
        };
        match &r {
            Err(PaymentError::Moved { .. }) => self.metrics.moved.inc(),
            Err(e @ PaymentError::RelayConflict { .. }) => {
                self.metrics.relay_conflicts.inc();
                tracing::error!(method, cell = %self.cell, colour = %self.colour, error = %e, "ALARM: relay message id reused with different content");
            }
            _ => {}
        }
        self.metrics
            .requests
            .with_label_values(&[method, code_label(code)])
            .inc();
        self.metrics
            .latency
            .with_label_values(&[method])
            .observe(started.elapsed().as_secs_f64());
        match r {
            Ok(v) => Ok(Response::new(v)),
            Err(e) => {
                if matches!(e.code(), tonic::Code::Internal | tonic::Code::Unknown) {
                    tracing::error!(method, cell = %self.cell, colour = %self.colour, error = %e, "request failed");
                } else {
                    tracing::debug!(error = %e, "request refused");
                }
                Err(e.into())
            }
        }
    }

    async fn write<T>(
        &self,
        method: &'static str,
        rid: String,
        cmd: Result<Command, PaymentError>,
        pick: impl FnOnce(Outcome) -> Option<T>,
    ) -> Result<Response<T>, Status> {
        let started = Instant::now();
        let user = cmd
            .as_ref()
            .map(|c| c.user().to_string())
            .unwrap_or_default();
        let shard = cmd.as_ref().map(|c| c.shard(self.shard_count)).unwrap_or(0);
        // Request spans are DEBUG: on the hot path even formatting their fields costs more
        // than the ledger work; `LDC_LOG=ldc_cell=debug` turns them on.
        let span = tracing::debug_span!("write", method, request_id = %rid, user = %user, shard, cell = %self.cell, colour = %self.colour, epoch = tracing::field::Empty);
        let r = async {
            let cmd = cmd?;
            cmd.validate()?;
            let (outcome, epoch) = self.writer.submit(cmd).await?;
            tracing::Span::current().record("epoch", epoch);
            pick(outcome).ok_or_else(|| PaymentError::Corrupt("unexpected outcome kind".into()))
        }
        .instrument(span)
        .await;
        self.finish(method, started, r)
    }

    async fn read<T: Send + 'static>(
        &self,
        method: &'static str,
        rid: String,
        user: String,
        f: impl FnOnce(&mut dyn ldc_store::Kv, &Ctx, u64) -> Result<T, PaymentError> + Send + 'static,
    ) -> Result<Response<T>, Status> {
        let started = Instant::now();
        let span = tracing::debug_span!("read", method, request_id = %rid, user = %user, cell = %self.cell, colour = %self.colour);
        let this = self.clone();
        let r = async move {
            validate_user("user_id", &user)?;
            let shard = shard_of(&user, this.shard_count);
            let writer = this.writer.clone();
            let r = tokio::task::spawn_blocking(move || {
                let mut t = this.store.begin_read()?;
                let epoch = ledger::fence_read(&mut *t, &this.cell, shard)?;
                let r = f(&mut *t, &this.ctx(), epoch);
                let _ = t.rollback();
                r
            })
            .await
            .map_err(|e| PaymentError::Corrupt(format!("read task failed: {e}")))??;
            // The snapshot may include batches of this cell that are committed but still
            // syncing; answer only once they are durable.
            writer.wait_durable().await?;
            Ok(r)
        }
        .instrument(span)
        .await;
        self.finish(method, started, r)
    }
}

fn payment(o: Outcome) -> Option<proto::Payment> {
    match o {
        Outcome::Payment(p) => Some(p),
        _ => None,
    }
}

#[tonic::async_trait]
impl Payments for CellService {
    async fn open_account(
        &self,
        req: Request<proto::OpenAccountRequest>,
    ) -> Result<Response<proto::Account>, Status> {
        let rid = request_id(&req);
        let cmd = check_header(&req, &req.get_ref().user_id).map(|_| {
            let r = req.into_inner();
            Command::OpenAccount {
                user: r.user_id,
                currency: r.currency,
                key: r.idempotency_key,
            }
        });
        self.write("OpenAccount", rid, cmd, |o| match o {
            Outcome::Account(a) => Some(a),
            _ => None,
        })
        .await
    }

    async fn top_up(
        &self,
        req: Request<proto::TopUpRequest>,
    ) -> Result<Response<proto::Payment>, Status> {
        let rid = request_id(&req);
        let cmd = check_header(&req, &req.get_ref().user_id).map(|_| {
            let r = req.into_inner();
            Command::TopUp {
                user: r.user_id,
                amount: r.amount,
                currency: r.currency,
                key: r.idempotency_key,
            }
        });
        self.write("TopUp", rid, cmd, payment).await
    }

    async fn withdraw(
        &self,
        req: Request<proto::WithdrawRequest>,
    ) -> Result<Response<proto::Payment>, Status> {
        let rid = request_id(&req);
        let cmd = check_header(&req, &req.get_ref().user_id).map(|_| {
            let r = req.into_inner();
            Command::Withdraw {
                user: r.user_id,
                amount: r.amount,
                currency: r.currency,
                key: r.idempotency_key,
            }
        });
        self.write("Withdraw", rid, cmd, payment).await
    }

    async fn transfer(
        &self,
        req: Request<proto::TransferRequest>,
    ) -> Result<Response<proto::Payment>, Status> {
        let rid = request_id(&req);
        let cmd = check_header(&req, &req.get_ref().user_id).map(|_| {
            let r = req.into_inner();
            Command::Transfer {
                user: r.user_id,
                to: r.to_user_id,
                amount: r.amount,
                currency: r.currency,
                key: r.idempotency_key,
            }
        });
        self.write("Transfer", rid, cmd, payment).await
    }

    async fn refund(
        &self,
        req: Request<proto::RefundRequest>,
    ) -> Result<Response<proto::Payment>, Status> {
        let rid = request_id(&req);
        let cmd = check_header(&req, &req.get_ref().user_id).map(|_| {
            let r = req.into_inner();
            Command::Refund {
                user: r.user_id,
                payment_id: r.payment_id,
                amount: r.amount,
                key: r.idempotency_key,
            }
        });
        self.write("Refund", rid, cmd, payment).await
    }

    async fn get_balance(
        &self,
        req: Request<proto::GetBalanceRequest>,
    ) -> Result<Response<proto::Account>, Status> {
        let rid = request_id(&req);
        if let Err(e) = check_header(&req, &req.get_ref().user_id) {
            return self.finish("GetBalance", Instant::now(), Err(e));
        }
        let user = req.into_inner().user_id;
        let u = user.clone();
        self.read("GetBalance", rid, user, move |kv, ctx, epoch| {
            ledger::get_balance(kv, ctx, epoch, &u)
        })
        .await
    }

    async fn get_payment(
        &self,
        req: Request<proto::GetPaymentRequest>,
    ) -> Result<Response<proto::Payment>, Status> {
        let rid = request_id(&req);
        if let Err(e) = check_header(&req, &req.get_ref().user_id) {
            return self.finish("GetPayment", Instant::now(), Err(e));
        }
        let r = req.into_inner();
        let u = r.user_id.clone();
        self.read("GetPayment", rid, r.user_id, move |kv, ctx, _| {
            ledger::get_payment(kv, ctx, &u, &r.payment_id)
        })
        .await
    }

    async fn list_entries(
        &self,
        req: Request<proto::ListEntriesRequest>,
    ) -> Result<Response<proto::ListEntriesResponse>, Status> {
        let rid = request_id(&req);
        if let Err(e) = check_header(&req, &req.get_ref().user_id) {
            return self.finish("ListEntries", Instant::now(), Err(e));
        }
        let r = req.into_inner();
        let u = r.user_id.clone();
        self.read("ListEntries", rid, r.user_id, move |kv, ctx, _| {
            ledger::list_entries(kv, ctx, &u, r.after_seq, r.limit)
        })
        .await
    }
}

#[tonic::async_trait]
impl CellRelay for CellService {
    async fn deliver(
        &self,
        req: Request<proto::Credit>,
    ) -> Result<Response<proto::DeliverResponse>, Status> {
        let rid = request_id(&req);
        let cmd = check_header(&req, &req.get_ref().to_user_id)
            .map(|_| Command::Deliver(req.into_inner()));
        self.write("Deliver", rid, cmd, delivered).await
    }

    async fn deliver_batch(
        &self,
        req: Request<proto::CreditBatch>,
    ) -> Result<Response<proto::DeliverBatchResponse>, Status> {
        let rid = request_id(&req);
        let credits = req.into_inner().credits;
        if credits.len() > DELIVER_BATCH_MAX {
            return Err(Status::invalid_argument(format!(
                "a batch holds at most {DELIVER_BATCH_MAX} credits, this one {}; send it in parts",
                credits.len()
            )));
        }
        // All at once, so the writer takes them into one store transaction.
        let mut tasks = tokio::task::JoinSet::new();
        let n = credits.len();
        for (i, c) in credits.into_iter().enumerate() {
            let (this, rid) = (self.clone(), rid.clone());
            tasks.spawn(async move {
                let r = this
                    .write("Deliver", rid, Ok(Command::Deliver(c)), delivered)
                    .await;
                (i, r)
            });
        }
        let mut results = vec![proto::DeliverResult::default(); n];
        while let Some(done) = tasks.join_next().await {
            let (i, r) = done.map_err(|_| Status::internal("a delivery task failed"))?;
            results[i] = match r {
                Ok(resp) => proto::DeliverResult {
                    response: Some(resp.into_inner()),
                    code: 0,
                    message: String::new(),
                },
                Err(s) => proto::DeliverResult {
                    response: None,
                    code: s.code() as i32,
                    message: s.message().to_string(),
                },
            };
        }
        Ok(Response::new(proto::DeliverBatchResponse { results }))
    }
}
