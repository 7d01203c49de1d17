//! The error chain rule, for every binary: an error's `Display` says what failed at its
//! own step and may include the text of its cause (most log lines print `{e}` alone and
//! must be complete); whoever prints a whole chain uses [`chain`], which appends a cause
//! only when its text is not already part of the message. So a refused connection reads
//! "cannot connect to h:6669: Connection refused (os error 111)", once, however many
//! layers wrap it.

use std::error::Error;

/// `err` and its causes as one line: "outer: inner: root", each text once.
pub fn chain(err: &(dyn Error + 'static)) -> String {
    let mut message = err.to_string();
    let mut cause = err.source();
    while let Some(inner) = cause {
        let text = inner.to_string();
        if !text.is_empty() && !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = inner.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot connect to {peer}: {source}")]
    struct Connect {
        peer: String,
        #[source]
        source: io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("notifier")]
    struct Context {
        #[source]
        source: Connect,
    }

    #[test]
    fn each_text_once() {
        let refused = || io::Error::from_raw_os_error(libc::ECONNREFUSED);
        let err = Context {
            source: Connect {
                peer: "h:6669".into(),
                source: refused(),
            },
        };
        let text = chain(&err);
        assert_eq!(
            text,
            format!("notifier: cannot connect to h:6669: {}", refused())
        );
        assert_eq!(text.matches("os error 111").count(), 1, "{text}");
    }
}
