"""CSS and the few lines of browser JavaScript the studio needs."""

from __future__ import annotations

# Clicks on buttons inside card grids and the detail view become one ``click`` event of the gr.HTML
# component, carrying the button's action and id (event delegation: the HTML is re-rendered often).
CARD_JS = """
element.addEventListener('click', (e) => {
  const b = e.target.closest('button[data-action]');
  if (!b || b.disabled) return;
  trigger('click', {action: b.dataset.action, id: b.dataset.id});
});
"""

CSS = """
.as-cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 10px; }
.as-card { border: 1px solid var(--border-color-primary); border-radius: 8px; overflow: hidden;
  background: var(--background-fill-secondary); display: flex; flex-direction: column; }
.as-thumb { aspect-ratio: 1 / 1; background: var(--background-fill-primary); display: flex;
  align-items: center; justify-content: center; overflow: hidden; max-height: 180px; }
.as-thumb img { width: 100%; height: 100%; object-fit: cover; image-rendering: pixelated; }
.as-noimg { font-size: 2.2em; font-weight: 600; opacity: 0.35; }
.as-body { padding: 8px; display: flex; flex-direction: column; gap: 4px; font-size: 0.9em; }
.as-name { font-weight: 600; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.as-badge { display: inline-block; padding: 0 6px; margin: 1px 2px 1px 0; border-radius: 10px;
  font-size: 0.8em; background: var(--background-fill-primary);
  border: 1px solid var(--border-color-primary); }
.as-why { font-size: 0.85em; opacity: 0.8; }
.as-triggers code, .as-detail code { font-size: 0.8em; margin: 1px 3px 1px 0; padding: 0 5px;
  border-radius: 4px;
  border: 1px solid var(--border-color-primary); background: var(--background-fill-primary);
  display: inline-block; }
.as-actions { display: flex; gap: 6px; flex-wrap: wrap; margin-top: 4px; }
.as-btn { padding: 3px 10px; border-radius: 6px; border: 1px solid var(--border-color-primary);
  background: var(--button-secondary-background-fill); cursor: pointer; font-size: 0.85em; }
.as-btn.as-primary { background: var(--button-primary-background-fill);
  color: var(--button-primary-text-color); }
.as-btn[disabled] { opacity: 0.55; cursor: default; }
.as-empty, .as-msg { padding: 12px; opacity: 0.8; }
.as-msg.as-warn { border-left: 4px solid #d97706; } .as-msg.as-error { border-left: 4px solid #dc2626; }
.as-detail h2 { margin: 0 0 4px 0; } .as-detail h3 { margin: 14px 0 4px 0; font-size: 1.05em; }
.as-cols { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.as-kv { border-collapse: collapse; } .as-kv th, .as-kv td { border: none !important;
  padding: 2px 10px 2px 0; }
.as-kv th { text-align: left; font-weight: 500; opacity: 0.75; }
.as-slot-title { padding: 6px 8px; }
.as-files { font-size: 0.85em; border-collapse: collapse; width: 100%; }
.as-files td, .as-files th { border: none !important;
  border-bottom: 1px solid var(--border-color-primary) !important;
  padding: 2px 6px; word-break: break-all; text-align: left; }
.as-previews { display: grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: 10px; }
.as-preview img { width: 100%; image-rendering: pixelated; border-radius: 6px; }
.as-prompt { font-size: 0.85em; } .as-params { font-size: 0.75em; opacity: 0.7; }
.as-description { max-height: 260px; overflow: auto; }
.as-progress { position: relative; height: 26px; border-radius: 6px; overflow: hidden;
  background: var(--background-fill-secondary); border: 1px solid var(--border-color-primary); }
.as-progress-fill { position: absolute; inset: 0 auto 0 0; background: var(--color-accent-soft, #c7d2fe); }
.as-progress span { position: relative; padding: 0 8px; line-height: 26px; font-size: 0.9em; }
.as-warnings { border-left: 4px solid #d97706; padding-left: 8px; }
"""
