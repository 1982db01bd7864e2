//! Mail of password accounts (verification and reset tokens) through SMTP with lettre
//! (`TALLY_SMTP_URL`, `TALLY_MAIL_FROM`). Sending happens in the background, so an answer never
//! waits for (or reveals, by its timing) a mail.

use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

/// What a mailed token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Confirms the email address (`POST /v1/auth/verify`).
    Verify,
    /// Sets a new password (`POST /v1/auth/password/reset`).
    Reset,
}

/// An SMTP sender.
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    public_url: Option<String>,
}

impl Mailer {
    /// The mailer of `config`; an error names the missing or malformed setting.
    pub fn from_config(config: &crate::Config) -> Result<Mailer, String> {
        let url = config.smtp_url.as_deref().filter(|u| !u.is_empty()).ok_or("TALLY_PASSWORD_AUTH=1 needs TALLY_SMTP_URL")?;
        let from = config.mail_from.as_deref().filter(|u| !u.is_empty()).ok_or("TALLY_PASSWORD_AUTH=1 needs TALLY_MAIL_FROM")?;
        let from: Mailbox = from.parse().map_err(|e| format!("TALLY_MAIL_FROM is not a mail address: {e}"))?;
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| format!("TALLY_SMTP_URL: {e}"))?
            .timeout(Some(std::time::Duration::from_secs(10)))
            .build();
        let public_url = config.public_url.as_ref().map(|u| u.trim_end_matches('/').to_string()).filter(|u| !u.is_empty());
        Ok(Mailer { transport, from, public_url })
    }

    /// The subject and text of a mail carrying `token`.
    fn compose(&self, purpose: Purpose, token: &str) -> (&'static str, String) {
        let (subject, what, page, hours) = match purpose {
            Purpose::Verify => ("Confirm your email address", "confirm your email address", "verify-email", 24),
            Purpose::Reset => ("Reset your password", "set a new password", "reset-password", 1),
        };
        let mut text = format!("Use this code to {what}:\n\n    {token}\n\n");
        if let Some(base) = &self.public_url {
            text.push_str(&format!("Or open {base}/{page}?token={token}\n\n"));
        }
        text.push_str(&format!("It works once, for {hours} hour{}.\n", if hours == 1 { "" } else { "s" }));
        (subject, text)
    }

    /// Sends `token` to `to` now.
    pub async fn send_now(&self, to: &str, purpose: Purpose, token: &str) -> Result<(), String> {
        let to: Mailbox = to.parse().map_err(|e| format!("not a mail address: {e}"))?;
        let (subject, text) = self.compose(purpose, token);
        let msg = Message::builder().from(self.from.clone()).to(to).subject(subject).body(text).map_err(|e| e.to_string())?;
        self.transport.send(msg).await.map(|_| ()).map_err(|e| e.to_string())
    }
}

/// Sends `token` to `to` with the server's mailer in the background; a failure is logged
/// (without the token or the address).
pub fn send_in_background(state: &crate::AppState, to: String, purpose: Purpose, token: String) {
    let state = state.clone();
    tokio::spawn(async move {
        let Some(mailer) = &state.mailer else { return };
        if let Err(e) = mailer.send_now(&to, purpose, &token).await {
            ::metrics::counter!("tally_mail_failures_total").increment(1);
            tracing::warn!(error = %e, ?purpose, "sending a mail failed");
        }
    });
}
