// collab-engine CodeMirror 6 binding: one editor view bound to one `CollabClient`
// (clients/js/collab.js).
//
// What it owns: turning every local transaction into client edits (each change of the
// transaction, in order, in code points), turning remote edits into CodeMirror transactions
// annotated as remote (kept out of the undo history, so undo only undoes the user's own
// edits and CodeMirror maps the history and the selection through them), the remote carets
// and selections (decorations, name and colour from presence), the read-only state, and IME:
// while the user composes, remote edits wait and are applied when the composition ends.
//
// What it must never do: let the editor's text and the client's replica disagree silently.
// The one rule that keeps them together: `pending` holds the remote edits the editor has not
// applied yet, as a ChangeSet on the editor's current text; the replica's text is always
// `pending` applied to the editor's text. A local transaction is mapped over `pending` before
// it goes to the replica, and `pending` is mapped over the transaction (remote first at a
// tie, on both sides: `A.compose(B.map(A))` equals `B.compose(A.map(B, true))`).
//
// Peer dependencies: @codemirror/state and @codemirror/view (see package.json).
import { Annotation, ChangeSet, Compartment, EditorSelection, EditorState, Facet, StateEffect, StateField, Transaction } from '@codemirror/state';
import { Decoration, EditorView, ViewPlugin, WidgetType } from '@codemirror/view';

/**
 * Annotates the transactions this binding dispatches for edits made elsewhere (remote edits,
 * caret redraws): read it to tell them apart; never put it on a transaction of your own.
 */
export const collabRemote = Annotation.define();

/** Replaces the remote caret decorations. */
const setRemoteCarets = StateEffect.define();

/** The other people's carets and selections; mapped through every change until redrawn. */
const remoteCaretField = StateField.define({
  create: () => Decoration.none,
  update(deco, tr) {
    let next = deco.map(tr.changes);
    for (const e of tr.effects) if (e.is(setRemoteCarets)) next = e.value;
    return next;
  },
  provide: (f) => EditorView.decorations.from(f),
});

/** What a presence state may say about a colour: a CSS hex colour, nothing else. */
const COLOR_RE = /^#[0-9a-fA-F]{3,8}$/;
/** Longest name shown beside a caret. */
const NAME_CHARS_MAX = 32;

function isAnchor(a) {
  return a === null || (Array.isArray(a) && a.length === 2 && Number.isSafeInteger(a[0]) && a[0] >= 0 &&
    Number.isSafeInteger(a[1]) && a[1] >= 0);
}

/** A remote caret: a thin bar in the person's colour with their name above it. */
class CaretWidget extends WidgetType {
  constructor(replica, name, color) {
    super();
    this.replica = replica;
    this.name = name;
    this.color = color;
  }

  eq(other) {
    return other.replica === this.replica && other.name === this.name && other.color === this.color;
  }

  toDOM() {
    const caret = document.createElement('span');
    caret.className = 'cm-remote-caret';
    caret.dataset.replica = String(this.replica);
    caret.dataset.name = this.name;
    caret.style.setProperty('--c', this.color);
    // A word joiner gives the bar the line's height without taking any width.
    caret.append('\u2060');
    const label = document.createElement('span');
    label.className = 'cm-remote-caret-label';
    label.textContent = this.name;
    caret.append(label);
    return caret;
  }

  ignoreEvent() { return true; }
}

const remoteCaretTheme = EditorView.baseTheme({
  '.cm-remote-caret': {
    position: 'relative',
    borderLeft: '2px solid var(--c)',
    marginLeft: '-1px',
    marginRight: '-1px',
  },
  '.cm-remote-caret-label': {
    position: 'absolute',
    top: '-1.35em',
    left: '-2px',
    padding: '0 4px',
    borderRadius: '3px 3px 3px 0',
    background: 'var(--c)',
    color: '#fff',
    fontSize: '11px',
    lineHeight: '1.35em',
    fontFamily: 'system-ui, sans-serif',
    whiteSpace: 'nowrap',
    pointerEvents: 'none',
    userSelect: 'none',
    zIndex: '10',
  },
  '.cm-remote-selection': { backgroundColor: 'color-mix(in srgb, var(--c) 22%, transparent)' },
});

/** The editor state facets for a read-only (or not yet joined) editor. */
function readOnlyExtension(readOnly) {
  return [EditorState.readOnly.of(readOnly), EditorView.editable.of(!readOnly)];
}

/** Remote transactions: marked as ours and remote, never in the undo history. */
const REMOTE_ANNOTATIONS = [collabRemote.of(true), Transaction.remote.of(true), Transaction.addToHistory.of(false)];

/** Time between checks for the end of an IME composition while remote edits wait. */
const COMPOSITION_POLL_MS = 50;

class CollabPlugin {
  constructor(view, client, opts, readOnlyCompartment) {
    this.view = view;
    this.client = client;
    this.presence = opts.presence || {};
    this.readOnlyCompartment = readOnlyCompartment;
    this.readOnly = !client.ready || client.readOnly;
    /** Remote edits not applied to the editor yet, as changes on the editor's text. */
    this.pending = ChangeSet.empty(view.state.doc.length);
    /** Whether `pending` replaces the whole text (a snapshot): the selection is found again by ids. */
    this.pendingReset = false;
    /** Set while `update` runs: a dispatch must wait for it to return. */
    this.inUpdate = false;
    /** Set while this binding hands a local edit to the client, whose `change` event echoes it. */
    this.editing = false;
    this.flushQueued = false;
    this.compositionTimer = null;
    this.caretsQueued = false;
    /** The ids our selection's ends were at when last published: a snapshot restores them. */
    this.anchors = null;
    this.lastPresenceKey = null;
    this.destroyed = false;
    this.offs = [
      client.on('change', (c) => this.onClientChange(c)),
      client.on('presence', () => this.queueCarets()),
      client.on('status', () => this.onStatus()),
      client.on('auth', () => this.onStatus()),
    ];
    if (view.state.doc.length !== client.doc.length16 || view.state.doc.toString() !== client.text()) {
      this.pending = ChangeSet.of({ from: 0, to: view.state.doc.length, insert: client.text() }, view.state.doc.length, '\n');
      this.pendingReset = true;
    }
    // The view is still being built: no dispatch before it is.
    this.deferFlush();
  }

  destroy() {
    for (const off of this.offs) off();
    clearTimeout(this.compositionTimer);
    this.destroyed = true;
  }

  /** Changes the extra presence fields (name, colour) and publishes them with the caret. */
  setPresence(fields) {
    this.presence = fields || {};
    this.publishCaret();
  }

  // --- remote edits --------------------------------------------------------------------

  onClientChange(c) {
    if (this.editing) return;
    const len = this.pending.newLength;
    try {
      if (c.reset) {
        this.pending = this.pending.compose(ChangeSet.of({ from: 0, to: len, insert: c.text }, len, '\n'));
        this.pendingReset = true;
      } else {
        const spec = { from: c.index16, to: c.index16 + c.length16, insert: c.text };
        this.pending = this.pending.compose(ChangeSet.of(spec, len, '\n'));
      }
    } catch (e) {
      // A change that does not fit the text we think the replica has: never guess, reload.
      this.resyncFromReplica();
    }
    this.queueFlush();
  }

  /** Makes the editor show the replica's text again (a last resort; keeps the selection by ids). */
  resyncFromReplica() {
    const len = this.view.state.doc.length;
    this.pending = ChangeSet.of({ from: 0, to: len, insert: this.client.text() }, len, '\n');
    this.pendingReset = true;
  }

  /** Applies the pending remote edits now when possible, else as soon as it is. */
  queueFlush() {
    if (this.destroyed) return;
    if (this.inUpdate) {
      this.deferFlush();
      return;
    }
    this.flush();
  }

  flush() {
    if (this.destroyed) return;
    this.syncReadOnly();
    if (this.pending.empty && !this.pendingReset) return;
    if (this.view.composing) {
      // Applying a change under an IME composition ends it; wait for the composition to end.
      if (this.compositionTimer === null) {
        this.compositionTimer = setTimeout(() => { this.compositionTimer = null; this.queueFlush(); }, COMPOSITION_POLL_MS);
      }
      return;
    }
    const reset = this.pendingReset;
    // After a snapshot (or a resync) the replica's text is the truth: change only the part
    // that differs, so that the undo history and the selection map through a small change.
    const changes = reset ? this.diffToReplica() : this.pending;
    this.pending = ChangeSet.empty(changes.newLength);
    this.pendingReset = false;
    const spec = { changes, annotations: REMOTE_ANNOTATIONS };
    if (reset) spec.selection = this.selectionFromAnchors(changes.newLength);
    try {
      this.view.dispatch(spec);
    } catch (e) {
      // Nothing was applied: keep the edits for the next attempt.
      this.pending = changes.compose(this.pending);
      this.pendingReset = this.pendingReset || reset;
      // The next remote edit or editor update tries again.
      this.client.emit('error', { code: 'binding', message: `remote edits not applied yet: ${e && e.message || e}` });
      return;
    }
    this.queueCarets();
  }

  /** The smallest single change from the editor's text to the replica's (common prefix and suffix kept). */
  diffToReplica() {
    const current = this.view.state.doc.toString();
    const target = this.client.text();
    const max = Math.min(current.length, target.length);
    let prefix = 0;
    while (prefix < max && current.charCodeAt(prefix) === target.charCodeAt(prefix)) prefix++;
    let suffix = 0;
    while (suffix < max - prefix && current.charCodeAt(current.length - 1 - suffix) === target.charCodeAt(target.length - 1 - suffix)) suffix++;
    if (prefix === current.length && prefix === target.length) return ChangeSet.empty(current.length);
    const spec = { from: prefix, to: current.length - suffix, insert: target.slice(prefix, target.length - suffix) };
    return ChangeSet.of(spec, current.length, '\n');
  }

  /** The local selection found again by the item ids of its ends (after a snapshot). */
  selectionFromAnchors(length16) {
    const sel = this.view.state.selection.main;
    const doc = this.client.doc;
    const resolve = (anchor, old) => {
      const id = this.client.resolveId(anchor);
      if (id && !doc.has(id)) return Math.min(old, length16);
      return Math.min(doc.cpToUtf16(doc.positionOfAnchor(id)), length16);
    };
    if (!this.anchors) return EditorSelection.single(Math.min(sel.anchor, length16), Math.min(sel.head, length16));
    return EditorSelection.single(resolve(this.anchors.anchor, sel.anchor), resolve(this.anchors.head, sel.head));
  }

  // --- local edits ---------------------------------------------------------------------

  update(update) {
    this.inUpdate = true;
    try {
      for (const tr of update.transactions) {
        if (tr.docChanged && !tr.annotation(collabRemote)) this.localChanges(tr.changes);
      }
      if (this.pending.length !== update.state.doc.length) {
        // Someone else dispatched changes under our annotation: the bookkeeping is lost, so
        // show the replica's text rather than guess.
        this.client.emit('error', { code: 'binding', message: 'editor and pending remote edits out of step; reloading the text' });
        this.resyncFromReplica();
      }
      if (update.docChanged || update.selectionSet || update.focusChanged) this.publishCaret();
    } finally {
      this.inUpdate = false;
    }
    // The view is still inside its update (other plugins, the DOM): dispatch once it is done.
    if ((!this.pending.empty || this.pendingReset) && !this.view.composing) this.deferFlush();
  }

  deferFlush() {
    if (this.flushQueued) return;
    this.flushQueued = true;
    queueMicrotask(() => { this.flushQueued = false; this.queueFlush(); });
  }

  /** Hands one local transaction's changes to the client, each in order, in code points. */
  localChanges(changes) {
    let mapped = changes;
    if (this.pending.empty) {
      this.pending = ChangeSet.empty(changes.newLength);
    } else {
      mapped = changes.map(this.pending);
      this.pending = this.pending.map(changes, true);
    }
    const client = this.client;
    if (!client.ready || client.readOnly) {
      // The filter keeps such edits out; should one slip through, the replica's text wins.
      this.resyncFromReplica();
      return;
    }
    const doc = client.doc;
    this.editing = true;
    try {
      // Change by change from the start: each one's `fromB` is where it starts in the text
      // left by the ones before it, which is the text the replica has at that moment.
      mapped.iterChanges((fromA, toA, fromB, _toB, inserted) => {
        const end16 = fromB + (toA - fromA);
        const start = doc.utf16ToCp(fromB);
        const end = doc.utf16ToCp(end16);
        if (doc.cpToUtf16(start) !== fromB || doc.cpToUtf16(end) !== end16) {
          // The change splits a surrogate pair, which a code point replica cannot: apply the
          // whole characters and let the editor show what the replica has.
          this.pendingReset = true;
        }
        client.replace(start, end - start, inserted.toString());
      });
    } catch (e) {
      client.emit('error', { code: 'binding', message: `local edit not applied: ${e && e.message || e}` });
      this.pendingReset = true;
    } finally {
      this.editing = false;
    }
    if (this.pendingReset) {
      const len = this.pending.newLength;
      this.pending = this.pending.compose(ChangeSet.of({ from: 0, to: len, insert: client.text() }, len, '\n'));
    }
  }

  /** Publishes the local selection as presence `{...fields, anchor, head}` (item ids). */
  publishCaret() {
    const client = this.client;
    if (!client.ready) return;
    const sel = this.view.state.selection.main;
    let a = sel.anchor;
    let h = sel.head;
    if (!this.pending.empty) { a = this.pending.mapPos(a); h = this.pending.mapPos(h); }
    const doc = client.doc;
    const anchor = doc.anchorAt(doc.utf16ToCp(a));
    const head = a === h ? anchor : doc.anchorAt(doc.utf16ToCp(h));
    this.anchors = { anchor, head };
    const key = JSON.stringify([anchor, head, this.presence]);
    if (key === this.lastPresenceKey) return;
    this.lastPresenceKey = key;
    client.setPresence({ ...this.presence, anchor, head });
  }

  // --- status --------------------------------------------------------------------------

  onStatus() {
    const readOnly = !this.client.ready || this.client.readOnly;
    if (readOnly !== this.readOnly) this.queueFlush();
    // A fresh join forgets what we published; publish again.
    if (this.client.status === 'connecting') this.lastPresenceKey = null;
  }

  syncReadOnly() {
    const readOnly = !this.client.ready || this.client.readOnly;
    if (readOnly === this.readOnly) return;
    this.readOnly = readOnly;
    this.view.dispatch({ effects: this.readOnlyCompartment.reconfigure(readOnlyExtension(readOnly)), annotations: collabRemote.of(true) });
    if (!readOnly) this.publishCaret();
  }

  // --- remote carets -------------------------------------------------------------------

  queueCarets() {
    if (this.caretsQueued || this.destroyed) return;
    this.caretsQueued = true;
    const run = () => { this.caretsQueued = false; this.drawCarets(); };
    if (typeof requestAnimationFrame === 'function') requestAnimationFrame(run); else setTimeout(run, 0);
  }

  drawCarets() {
    if (this.destroyed) return;
    if (this.inUpdate || !this.pending.empty || this.pendingReset) {
      // Positions below are the replica's; draw once the editor has caught up.
      this.queueCarets();
      return;
    }
    const client = this.client;
    const doc = client.doc;
    const ranges = [];
    if (client.ready) {
      for (const [replica, st] of client.peers) {
        if (!st || typeof st !== 'object') continue;
        const head = st.head ?? null;
        const anchor = st.anchor ?? head;
        if (!isAnchor(head) || !isAnchor(anchor)) continue;
        // Presence can overtake the edit it points into; the next draw (after that edit) shows it.
        if ((head && !doc.has(head)) || (anchor && !doc.has(anchor))) continue;
        const verified = client.peerUsers?.get(replica);
        const raw = verified && typeof verified.name === 'string' && verified.name ? verified.name
          : typeof st.name === 'string' && st.name ? st.name : `replica ${replica}`;
        const name = Array.from(raw).slice(0, NAME_CHARS_MAX).join('');
        const color = typeof st.color === 'string' && COLOR_RE.test(st.color) ? st.color : '#888888';
        const h = doc.cpToUtf16(doc.positionOfAnchor(head));
        const a = doc.cpToUtf16(doc.positionOfAnchor(anchor));
        if (a !== h) {
          ranges.push(Decoration.mark({ class: 'cm-remote-selection', attributes: { style: `--c: ${color}` } }).range(Math.min(a, h), Math.max(a, h)));
        }
        ranges.push(Decoration.widget({ widget: new CaretWidget(replica, name, color), side: 1 }).range(h));
      }
    }
    const deco = Decoration.set(ranges, true);
    this.view.dispatch({ effects: setRemoteCarets.of(deco), annotations: collabRemote.of(true) });
  }
}

/**
 * The CodeMirror extension that binds an editor to `client` (a `CollabClient`). Create the
 * view with `doc: client.text()` (or anything: the binding replaces it with the client's
 * text). Include `history()` from @codemirror/commands for undo; remote edits never enter it.
 *
 * @param {import('../js/collab.js').CollabClient} client
 * @param {object} [opts]
 * @param {object} [opts.presence]  extra presence fields published with the caret (name, color)
 * @returns {import('@codemirror/state').Extension}
 */
export function collab(client, opts = {}) {
  const readOnlyCompartment = new Compartment();
  const plugin = ViewPlugin.define((view) => new CollabPlugin(view, client, opts, readOnlyCompartment), {
    eventHandlers: {
      compositionend() { this.queueFlush(); },
    },
  });
  // The replica's text is byte for byte the editor's: `\r` stays a character.
  return [
    EditorState.lineSeparator.of('\n'),
    readOnlyCompartment.of(readOnlyExtension(!client.ready || client.readOnly)),
    // A local edit the client cannot take (not joined yet, read-only, denied) never happens.
    EditorState.transactionFilter.of((tr) => (tr.docChanged && !tr.annotation(collabRemote) &&
      (!client.ready || client.readOnly) ? [] : tr)),
    remoteCaretField,
    remoteCaretTheme,
    plugin,
    collabPluginFacet.of(plugin),
  ];
}

/** Finds the plugin of a view without exporting its class. */
const collabPluginFacet = Facet.define();

/**
 * The binding of `view` (or null): `setPresence(fields)` changes the name and colour
 * published with the caret; `pending` holds the remote edits waiting for a composition.
 */
export function collabBinding(view) {
  for (const plugin of view.state.facet(collabPluginFacet)) {
    const p = view.plugin(plugin);
    if (p) return p;
  }
  return null;
}
