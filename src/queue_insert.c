/*
 * queue_insert.c: writing a trade's rows into trace.trace_queue without
 * the SQL executor, as INSERT ... ON CONFLICT (trade_id, adapter) would
 * for a row that is not there yet.
 *
 * Running the prepared enqueue statement cost a trade close more than the
 * rows themselves: starting and ending an executor, opening the queue and
 * its indexes, and rebuilding at every statement the queue's CHECK
 * expression from its stored text.  Here each row takes PostgreSQL's own
 * path for an INSERT ... ON CONFLICT: the column defaults the rewriter
 * would add (the identity from its sequence, now(), 'pending', ...), the
 * table's NOT NULL and CHECK constraints (ExecConstraints), a speculative
 * heap insertion, the index entries with the unique key (trade_id,
 * adapter) as arbiter (ExecInsertIndexTuples), and the speculative
 * insertion confirmed, or killed if the key turned out to be taken.
 *
 * A taken key is not handled here: the caller runs the enqueue statement
 * for those adapters, whose ON CONFLICT waits for a concurrent inserter
 * and re-arms a cancelled row exactly as before.  (Unlike the executor, no
 * non-conclusive check precedes the insertion: a re-close is rare, and
 * costs one killed heap tuple and its index entries.)
 *
 * The compiled defaults and CHECK expressions are kept for the session and
 * dropped when the relcache reports a change to the queue or the catalog
 * reports a changed function; they are trusted only once the queue is
 * locked, which is when such reports are read.  Anything this file does
 * not reproduce makes it decline (the caller then runs the statement): a
 * queue with row-level security, a trigger other than the statement-level
 * wake trigger (whose work, the wake at commit, the caller asks for), a
 * generated column, an unexpected column type, no INSERT privilege, or no
 * unique index on (trade_id, adapter).
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/index.h"
#include "catalog/namespace.h"
#include "catalog/pg_am.h"
#include "catalog/pg_trigger.h"
#include "catalog/pg_type.h"
#include "executor/executor.h"
#include "miscadmin.h"
#include "nodes/execnodes.h"
#include "optimizer/optimizer.h"
#include "rewrite/rewriteHandler.h"
#include "storage/lmgr.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"

#include "src/trace_ext.h"

/* The queue as this file knows it; in shape_cxt. */
typedef struct QueueShape
{
	Oid			relid;
	bool		usable;
	AttrNumber	trade_id;
	AttrNumber	adapter;
	AttrNumber	trade_table;
	AttrNumber	due_at;
	AttrNumber	by_operator;	/* 0: the queue has no such column */
	int			natts;
	ExprState **defaults;		/* per column; NULL: none, or ours */
	int			ncheck;
	ExprState **checks;			/* as ExecRelCheck would build them */
	int			nindexes;		/* -1: let ExecOpenIndices find them */
	Oid		   *indexids;
	IndexInfo **indexinfos;		/* predicates compiled */
} QueueShape;

static MemoryContext shape_cxt = NULL;
static QueueShape *shape = NULL;
static bool shape_stale = false;
static bool callbacks_registered = false;

/*
 * A report about the queue or one of its indexes makes the shape stale; so
 * does any report while the shape is being built (shape is NULL then: what
 * the build read may already be old).
 */
static void
queue_relcache_callback(Datum arg, Oid relid)
{
	if (shape == NULL)
	{
		shape_stale = true;
		return;
	}
	if (!OidIsValid(relid) || relid == shape->relid)
		shape_stale = true;
	for (int i = 0; i < shape->nindexes; i++)
		if (shape->indexids[i] == relid)
			shape_stale = true;
}

static void
queue_proc_callback(Datum arg, int cacheid, uint32 hashvalue)
{
	shape_stale = true;
}

/* A column's number if it exists with this type; 0 if it does not; -1 if another type. */
static AttrNumber
queue_column(Relation rel, const char *name, Oid type)
{
	AttrNumber	attno = get_attnum(RelationGetRelid(rel), name);

	if (attno <= 0)
		return 0;
	if (TupleDescAttr(RelationGetDescr(rel), attno - 1)->atttypid != type)
		return -1;
	return attno;
}

/* A compiled expression, in the current (long-lived) memory context. */
static ExprState *
compile(Node *expr)
{
	return ExecInitExpr(expression_planner((Expr *) expr), NULL);
}

static void
build_defaults(Relation rel, QueueShape *s)
{
	TupleDesc	desc = RelationGetDescr(rel);

	s->defaults = palloc0(sizeof(ExprState *) * s->natts);
	for (int i = 0; i < s->natts; i++)
	{
		AttrNumber	attno = i + 1;
		Node	   *def;

		if (TupleDescAttr(desc, i)->attisdropped || attno == s->trade_id ||
			attno == s->adapter || attno == s->trade_table ||
			attno == s->due_at || attno == s->by_operator)
			continue;
		def = build_column_default(rel, attno);
		if (def != NULL)
			s->defaults[i] = compile(def);
	}
}

static void
build_checks(Relation rel, QueueShape *s)
{
	TupleConstr *constr = RelationGetDescr(rel)->constr;

	s->ncheck = constr ? constr->num_check : 0;
	if (s->ncheck != rel->rd_rel->relchecks)
		return;					/* ExecRelCheck's error, from the statement */
	s->checks = palloc0(sizeof(ExprState *) * Max(s->ncheck, 1));
	for (int i = 0; i < s->ncheck; i++)
		s->checks[i] = compile(stringToNode(constr->check[i].ccbin));
}

/*
 * The queue's indexes, as ExecOpenIndices(..., true) describes them, with
 * the predicates of the partial ones compiled once (ExecInsertIndexTuples
 * would compile them at every statement).  Only btree indexes without
 * expressions: another access method may keep state of its own in the
 * IndexInfo (ii_AmCache), and an index that does makes ExecOpenIndices
 * describe them all at every call instead.
 */
static void
build_indexes(Relation rel, QueueShape *s)
{
	List	   *ids = RelationGetIndexList(rel);
	ListCell   *lc;
	int			n = 0;

	s->nindexes = -1;
	s->indexids = palloc(sizeof(Oid) * Max(list_length(ids), 1));
	s->indexinfos = palloc(sizeof(IndexInfo *) * Max(list_length(ids), 1));
	foreach(lc, ids)
	{
		Relation	index = index_open(lfirst_oid(lc), RowExclusiveLock);
		IndexInfo  *ii = BuildIndexInfo(index);
		bool		plain = index->rd_rel->relam == BTREE_AM_OID &&
			ii->ii_Expressions == NIL;

		if (plain && ii->ii_Unique)
			BuildSpeculativeIndexInfo(index, ii);
		index_close(index, NoLock);
		if (!plain)
			return;
		if (ii->ii_Predicate != NIL)
			ii->ii_PredicateState =
				ExecInitQual((List *) expression_planner((Expr *) ii->ii_Predicate), NULL);
		s->indexids[n] = lfirst_oid(lc);
		s->indexinfos[n] = ii;
		n++;
	}
	s->nindexes = n;
}

/* Are these the indexes the shape describes? */
static bool
same_indexes(Relation rel)
{
	List	   *ids = RelationGetIndexList(rel);
	bool		same = list_length(ids) == shape->nindexes;

	for (int i = 0; same && i < shape->nindexes; i++)
		same = list_nth_oid(ids, i) == shape->indexids[i];
	list_free(ids);
	return same;
}

/*
 * Open the queue's indexes, described by the shape if it could, and if
 * they are still the ones it describes (the relcache reports that a new
 * index makes the shape stale: this is a guard).
 */
static void
open_indexes(ResultRelInfo *rri)
{
	if (shape->nindexes < 0 || !same_indexes(rri->ri_RelationDesc))
	{
		ExecOpenIndices(rri, true);
		return;
	}
	rri->ri_NumIndices = shape->nindexes;
	rri->ri_IndexRelationDescs = palloc(sizeof(Relation) * Max(shape->nindexes, 1));
	rri->ri_IndexRelationInfo = palloc(sizeof(IndexInfo *) * Max(shape->nindexes, 1));
	for (int i = 0; i < shape->nindexes; i++)
	{
		rri->ri_IndexRelationDescs[i] = index_open(shape->indexids[i], RowExclusiveLock);
		rri->ri_IndexRelationInfo[i] = shape->indexinfos[i];
	}
}

/*
 * Close the indexes, keeping their locks to the end of the transaction, as
 * the queue's own (ExecCloseIndices would release them, and the next close
 * in the transaction take them again).
 */
static void
close_indexes(ResultRelInfo *rri)
{
	for (int i = 0; i < rri->ri_NumIndices; i++)
		index_close(rri->ri_IndexRelationDescs[i], NoLock);
}

/* What the queue looks like, found out with the queue locked. */
static void
build_shape(Relation rel)
{
	MemoryContext old;
	QueueShape *s;

	/* No shape is kept before the reports that make it stale are heard. */
	if (!callbacks_registered)
	{
		CacheRegisterRelcacheCallback(queue_relcache_callback, (Datum) 0);
		CacheRegisterSyscacheCallback(PROCOID, queue_proc_callback, (Datum) 0);
		callbacks_registered = true;
	}
	if (shape_cxt == NULL)
		shape_cxt = AllocSetContextCreate(CacheMemoryContext, "trace_ext queue shape",
										  ALLOCSET_SMALL_SIZES);
	shape = NULL;
	MemoryContextReset(shape_cxt);
	shape_stale = false;

	old = MemoryContextSwitchTo(shape_cxt);
	s = palloc0(sizeof(QueueShape));
	s->relid = RelationGetRelid(rel);
	s->natts = RelationGetDescr(rel)->natts;
	s->trade_id = queue_column(rel, "trade_id", INT8OID);
	s->adapter = queue_column(rel, "adapter", TEXTOID);
	s->trade_table = queue_column(rel, "trade_table", REGCLASSOID);
	s->due_at = queue_column(rel, "due_at", TIMESTAMPTZOID);
	s->by_operator = queue_column(rel, "by_operator", BOOLOID);
	s->usable = s->trade_id > 0 && s->adapter > 0 && s->trade_table > 0 &&
		s->due_at > 0 && s->by_operator >= 0 &&
		!(RelationGetDescr(rel)->constr &&
		  RelationGetDescr(rel)->constr->has_generated_stored);
	if (s->usable)
	{
		build_defaults(rel, s);
		build_checks(rel, s);
		build_indexes(rel, s);
		s->usable = s->checks != NULL;
	}
	MemoryContextSwitchTo(old);
	shape = s;
}

/*
 * Must the shape be found out again?  The reports say so; the column and
 * CHECK counts are compared as well, as a guard (ExecRelCheck indexes our
 * array by the relation's constraints).
 */
static bool
shape_outdated(Relation rel)
{
	TupleConstr *constr = RelationGetDescr(rel)->constr;

	return shape == NULL || shape_stale || shape->relid != RelationGetRelid(rel) ||
		shape->natts != RelationGetDescr(rel)->natts ||
		shape->ncheck != (constr ? constr->num_check : 0);
}

/*
 * The triggers the statement would fire: none, or only statement-level
 * ones named trace_queue_wake (the wake at commit, which the caller asks
 * for itself).
 */
static bool
triggers_ok(Relation rel)
{
	TriggerDesc *td = rel->trigdesc;

	if (td == NULL)
		return true;
	if (td->trig_insert_before_row || td->trig_insert_after_row ||
		td->trig_insert_instead_row || td->trig_insert_new_table)
		return false;
	for (int i = 0; i < td->numtriggers; i++)
	{
		Trigger    *t = &td->triggers[i];

		if (TRIGGER_FOR_INSERT(t->tgtype) && strcmp(t->tgname, "trace_queue_wake") != 0)
			return false;
	}
	return true;
}

/* The unique index on exactly (trade_id, adapter): the ON CONFLICT arbiter. */
static Oid
arbiter_index(ResultRelInfo *rri)
{
	for (int i = 0; i < rri->ri_NumIndices; i++)
	{
		IndexInfo  *ii = rri->ri_IndexRelationInfo[i];
		Relation	index = rri->ri_IndexRelationDescs[i];
		AttrNumber *keys = ii->ii_IndexAttrNumbers;

		if (!ii->ii_Unique || ii->ii_NumIndexKeyAttrs != 2 ||
			ii->ii_Expressions != NIL || ii->ii_Predicate != NIL ||
			!index->rd_index->indisvalid || !index->rd_index->indimmediate)
			continue;
		if ((keys[0] == shape->trade_id && keys[1] == shape->adapter) ||
			(keys[0] == shape->adapter && keys[1] == shape->trade_id))
			return RelationGetRelid(index);
	}
	return InvalidOid;
}

/* Fill the slot with one queue row: our values, the defaults for the rest. */
static void
form_row(TupleTableSlot *slot, EState *estate, const TraceQueueRow *row,
		 const char *adapter)
{
	ExprContext *econtext = GetPerTupleExprContext(estate);

	ExecClearTuple(slot);
	for (int i = 0; i < shape->natts; i++)
	{
		slot->tts_isnull[i] = true;
		slot->tts_values[i] = (Datum) 0;
		if (shape->defaults[i] != NULL)
			slot->tts_values[i] = ExecEvalExprSwitchContext(shape->defaults[i], econtext,
															&slot->tts_isnull[i]);
	}
	slot->tts_values[shape->trade_id - 1] = Int64GetDatum(row->trade_id);
	slot->tts_values[shape->adapter - 1] = CStringGetTextDatum(adapter);
	slot->tts_values[shape->trade_table - 1] = ObjectIdGetDatum(row->trade_table);
	slot->tts_values[shape->due_at - 1] = TimestampTzGetDatum(row->due_at);
	slot->tts_isnull[shape->trade_id - 1] = false;
	slot->tts_isnull[shape->adapter - 1] = false;
	slot->tts_isnull[shape->trade_table - 1] = false;
	slot->tts_isnull[shape->due_at - 1] = false;
	if (shape->by_operator > 0)
	{
		slot->tts_values[shape->by_operator - 1] = BoolGetDatum(row->by_operator);
		slot->tts_isnull[shape->by_operator - 1] = false;
	}
	ExecStoreVirtualTuple(slot);
}

/*
 * Insert one row speculatively, with its index entries; false (and the
 * row killed) if its (trade_id, adapter) is taken.
 */
static bool
insert_row(ResultRelInfo *rri, TupleTableSlot *slot, EState *estate, List *arbiter)
{
	Relation	rel = rri->ri_RelationDesc;
	TransactionId xid = GetCurrentTransactionId();
	uint32		token;
	bool		conflict = false;
	List	   *recheck;

	slot->tts_tableOid = RelationGetRelid(rel);
	if (rel->rd_att->constr)
		ExecConstraints(rri, slot, estate);

	token = SpeculativeInsertionLockAcquire(xid);
	table_tuple_insert_speculative(rel, slot, estate->es_output_cid, 0, NULL, token);
	recheck = ExecInsertIndexTuples(rri, slot, estate, false, true, &conflict, arbiter);
	table_tuple_complete_speculative(rel, slot, token, !conflict);
	SpeculativeInsertionLockRelease(xid);
	list_free(recheck);
	ResetPerTupleExprContext(estate);
	return !conflict;
}

/*
 * Insert the rows of row->adapters[] (true: queue it).  Returns the rows
 * inserted, marking in taken[] the adapters whose key was taken; -1 (and
 * nothing written) when this queue must be written by the statement.
 * The caller has pushed the snapshot the statement would run with and made
 * the command counter current.
 */
int
trace_queue_insert(const TraceQueueRow *row, bool *taken)
{
	Oid			nsp = get_namespace_oid("trace", true);
	Oid			relid = OidIsValid(nsp) ? get_relname_relid("trace_queue", nsp) : InvalidOid;
	Relation	rel;
	EState	   *estate;
	ResultRelInfo *rri;
	TupleTableSlot *slot;
	List	   *arbiter;
	int			inserted = 0;

	if (!OidIsValid(relid))
		return -1;
	rel = table_open(relid, RowExclusiveLock);
	if (shape_outdated(rel))
		build_shape(rel);
	if (!shape->usable || rel->rd_rel->relkind != RELKIND_RELATION ||
		rel->rd_rel->relrowsecurity || !triggers_ok(rel) ||
		pg_class_aclcheck(relid, GetUserId(), ACL_INSERT) != ACLCHECK_OK)
	{
		table_close(rel, NoLock);
		return -1;
	}

	estate = CreateExecutorState();
	estate->es_output_cid = GetCurrentCommandId(true);
	estate->es_snapshot = GetActiveSnapshot();
	rri = makeNode(ResultRelInfo);
	InitResultRelInfo(rri, rel, 0, NULL, 0);
	open_indexes(rri);
	arbiter = list_make1_oid(arbiter_index(rri));
	if (!OidIsValid(linitial_oid(arbiter)))
	{
		close_indexes(rri);
		FreeExecutorState(estate);
		table_close(rel, NoLock);
		return -1;
	}
	/* ExecRelCheck builds these when they are missing: give it ours. */
	rri->ri_ConstraintExprs = palloc(sizeof(ExprState *) * Max(shape->ncheck, 1));
	memcpy(rri->ri_ConstraintExprs, shape->checks, sizeof(ExprState *) * shape->ncheck);

	slot = MakeSingleTupleTableSlot(RelationGetDescr(rel), table_slot_callbacks(rel));
	for (int kind = 0; kind < trace_num_adapters; kind++)
	{
		taken[kind] = false;
		if (!row->adapters[kind])
			continue;
		form_row(slot, estate, row, trace_adapter_name(kind));
		if (insert_row(rri, slot, estate, arbiter))
			inserted++;
		else
			taken[kind] = true;
	}
	ExecDropSingleTupleTableSlot(slot);
	close_indexes(rri);
	FreeExecutorState(estate);
	table_close(rel, NoLock);
	return inserted;
}
